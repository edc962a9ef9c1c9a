"""One fine-tuning job end to end, as `lorakit train` runs it: resolve the configuration, start the
processes, and run the recipe's phases (`lorakit.train.recipe`), which leave in the output folder the
adapter, its resolved config, metrics, a loss curve and the predictions before and after.
"""

from __future__ import annotations

from typing import Any

from .config import DEFAULT_MODEL, RunConfig, RunError
from .distributed import init_parallel, shutdown
from .recipe import CONFIG_FILE, PEFT_TASK_TYPE, RESULTS_FILE, Log, TrainingRecipe

__all__ = ["CONFIG_FILE", "DEFAULT_MODEL", "PEFT_TASK_TYPE", "RESULTS_FILE", "RunConfig", "RunError", "run_training"]


def run_training(cfg: RunConfig, log: Log = print) -> dict[str, Any]:
    """Run one job; returns the summary written to results.json.

    Under torchrun every process runs this: all load the data and model (with the same seed, so the
    adapter starts identical everywhere), split the work, and only rank 0 logs and writes files.
    """
    cfg = cfg.resolved()
    parallel = init_parallel(cfg.distributed, cfg.dist_timeout)
    try:
        summary = TrainingRecipe(cfg, parallel, log if parallel.is_main else (lambda message: None)).run()
        # After the last collective (the summary's gather) rank 0 still writes results.json: the others wait
        # for it here, so that no process tears its process group down while a peer still holds a connection.
        parallel.barrier()
        return summary
    finally:
        shutdown(parallel)
