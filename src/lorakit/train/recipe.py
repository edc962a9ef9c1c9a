"""The phases of a training job, in the order `run_training` runs them: check the options and the output
folder, set up the data, the model and the fine-tuning method, score the base model, train, score again,
and write the summary. `TrainingRecipe` holds what each phase leaves for the next; the pieces a
comparison script needs on a model it loaded itself (`apply_tuning`, `measured_training`,
`method_latency`) are functions of their own.

Device and precision (`lorakit.device`): the model is loaded with its frozen base in the compute dtype and
put on the device; whatever trains is then float32 (master weights), and every forward pass (training,
validation loss, scoring, latency) runs under autocast in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from torch import nn

from ..atomic import atomic_write
from ..device import (
    autocast,
    peak_memory_mb,
    place,
    precision_name,
    resolve_device,
    resolve_precision,
    trainable_to_float32,
)
from ..methods import METHOD_OPTION_NAMES, FineTuningMethod, MethodOptions, disabled, get_method
from ..methods.measure import PeakRss, forward_latency_ms, weights_bytes
from ..models import load_model, model_reference
from ..quant import quantize
from .checkpointing import checkpointable_blocks, memory_budget
from .config import RunConfig, RunError
from .data import (
    CLASSIFICATION,
    GENERATION,
    REGRESSION,
    ClassExample,
    Collator,
    DataError,
    Example,
    apply_prompt_format,
)
from .distributed import Parallel
from .evaluate import evaluate_split, mean_loss
from .long_rows import auto_max_length, describe, encode_whole, limit_rows, model_context
from .loop import LoopSettings, TrainResult, checkpointed_blocks, latest_checkpoint, train_adapter
from .memory_plan import plan_text, step_plan
from .splits import load_splits
from .tasks import choose_task

CONFIG_FILE = "train_config.yaml"
RESULTS_FILE = "results.json"
PEFT_TASK_TYPE = {GENERATION: "CAUSAL_LM", CLASSIFICATION: "SEQ_CLS", REGRESSION: "SEQ_CLS"}
Log = Callable[[str], None]


def apply_tuning(
    model: nn.Module, method: FineTuningMethod, options: MethodOptions, quantized: str | None = None, log: Log = print
) -> tuple[int, int]:
    """Quantize the frozen base when asked (QLoRA), apply `method`, and log what trains; returns
    (trainable, total) parameters. What the method refuses is a one-line RunError."""
    if quantized:
        try:  # the default skip list keeps the output head and classification heads (trained in full) in float
            log(quantize(model, quantized).summary())
        except ValueError as err:
            raise RunError(str(err)) from None
    try:
        trainable, total = method.apply(model, options)
    except (ValueError, TypeError) as err:
        raise RunError(f"--method {method.name}: {err}") from None
    log(method.describe(model))
    return trainable, total


def method_latency(
    model: nn.Module, method: FineTuningMethod, batch: dict[str, torch.Tensor], quantized: bool = False
) -> dict[str, float]:
    """Milliseconds of one forward pass with the method, and merged into the base where it merges (not on a
    quantized base): merged, LoRA runs as fast as the base."""
    latency = {method.name: forward_latency_ms(model, batch)}
    if method.mergeable and not quantized:
        with method.merged(model):
            latency[f"{method.name}_merged"] = forward_latency_ms(model, batch)
    return latency


def measured_training(
    model: nn.Module,
    features: Sequence[dict],
    collate: Callable,
    settings: LoopSettings,
    out: str | Path,
    **loop_options: Any,
) -> tuple[TrainResult, PeakRss]:
    """`train_adapter` with the resident memory sampled while it runs."""
    with PeakRss() as memory:
        result = train_adapter(model, features, collate, settings, out, **loop_options)
    return result, memory


def prediction_row(prediction: Any, example: Example | ClassExample) -> dict[str, Any]:
    """One line of predictions_<tag>.jsonl: the prediction beside what it is scored against."""
    if isinstance(example, ClassExample):
        return {"prediction": prediction, "label": example.label}
    return {"prediction": prediction, "prompt": example.prompt, "references": example.references}


def check_output(cfg: RunConfig) -> Path:
    """The output folder, when it is free, or holds this run to resume, or may be overwritten."""
    out = Path(cfg.output)
    previous_file = out / CONFIG_FILE
    if out.exists() and not out.is_dir():
        raise RunError(f"output {out} exists and is not a folder")
    if not previous_file.is_file():
        if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
            raise RunError(
                f"output folder {out} is not empty and holds no lorakit run; pick another or pass --overwrite"
            )
        return out
    if cfg.resume:
        changed = cfg.changed_since(yaml.safe_load(previous_file.read_text()) or {})
        if changed:
            raise RunError(
                f"--resume: {out} holds a run with different {', '.join(changed)}; resume with the same options"
            )
        return out
    if not cfg.overwrite:
        raise RunError(
            f"output folder {out} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    return out


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


class TrainingRecipe:
    """One job's phases over a resolved config; each phase sets what the later ones read.

    Under torchrun every process runs every phase (with the same seed, so the method starts identical
    everywhere); only rank 0 logs and writes files."""

    def __init__(self, cfg: RunConfig, parallel: Parallel, log: Log) -> None:
        self.cfg, self.parallel, self.log = cfg, parallel, log

    def run(self) -> dict[str, Any]:
        self.setup_run()
        self.setup_data()
        self.setup_model()
        self.setup_method()
        previous = self.write_config()
        before = previous["before"] if "before" in previous else self.score_base() if self.cfg.score_base else {}
        result, memory = measured_training(
            self.model,
            self.train_features,
            self.collate,
            self.planned_loop(),
            self.out,
            evaluate=self.validation_loss,
            resume=self.cfg.resume,
            adapter_meta=self.meta,
            parallel=self.parallel,
            precision=self.dtype,
        )
        return self.summarize(before, self.score("after"), result, memory)

    def planned_loop(self) -> LoopSettings:
        """The loop settings with `--grad-checkpointing auto` decided (`train.checkpointing`): the fewest blocks
        whose estimated step fits the memory budget on every process, said when any."""
        cfg = self.cfg
        if cfg.grad_checkpointing != "auto":
            return cfg.loop
        names = ("r", "alpha", "dropout", "target_modules", "quantize", "batch_size", *METHOD_OPTION_NAMES)
        options = {name: getattr(cfg, name) for name in names}
        options.update(max_length=self.max_length, task=cfg.task)
        plan = step_plan(self.model, cfg.method, options, cfg.precision)
        budget = memory_budget(cfg.loop.memory_limit_bytes, self.device)  # read once: decision and message
        blocks = checkpointed_blocks(self.model, "auto", plan, budget, self.parallel)
        if blocks:
            total = len(checkpointable_blocks(self.model))
            self.log(f"activation checkpointing: {blocks} of {total} blocks ({plan_text(plan, blocks, budget)})")
        return dataclasses.replace(cfg.loop, grad_checkpointing=str(blocks))

    def autocast(self) -> Any:
        """The forward passes' autocast (nothing in float32)."""
        return autocast(self.device, self.dtype)

    def validation_loss(self, model: nn.Module) -> dict[str, float]:
        with self.autocast():
            return {"eval_loss": mean_loss(model, self.val_features, self.collate, parallel=self.parallel)}

    def setup_run(self) -> None:
        """Refuse what cannot run before anything slow (the method, tensorboard, the output folder), and seed."""
        cfg = self.cfg
        if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise RunError("--tensorboard needs the tensorboard package: pip install tensorboard")
        try:
            self.method = get_method(cfg.method)
        except ValueError as err:
            raise RunError(str(err)) from None
        if cfg.quantize and not self.method.quantizable_base:
            raise RunError(
                f"--quantize freezes the base for LoRA (QLoRA); it does not combine with --method {cfg.method}"
            )
        self.device = resolve_device(cfg.device)  # a device that is not there: a one-line error, nothing written
        self.dtype = resolve_precision(cfg.precision, self.device)
        self.out = check_output(cfg)
        self.parallel.barrier()  # every process has checked the folder before rank 0 writes into it
        if self.parallel.active:
            self.log(f"distributed: {self.parallel.mode} over {self.parallel.world} processes")
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

    def setup_data(self) -> None:
        cfg = self.cfg
        if cfg.task == REGRESSION and cfg.label_smoothing:
            raise RunError("--label-smoothing needs classes or tokens to spread over; a regression task has neither")
        try:
            self.train, self.validation, self.scored = load_splits(cfg)
        except DataError as err:
            raise RunError(str(err)) from None
        choice = choose_task(None, cfg.data, cfg.model, cfg.target_field, cfg.columns)
        reason = choice.reason if choice.task == cfg.task else "given"
        self.log(f"task: {cfg.task} ({reason})")
        evaluation = f" (from {cfg.eval_data})" if cfg.eval_data else ""
        self.log(
            f"data: {cfg.data} ({cfg.task}) — {len(self.train)} training, {len(self.validation)} validation, "
            f"{len(self.scored)} scored examples{evaluation}"
        )

    def setup_model(self) -> None:
        """Load the model, encode the data, and time the base model on one fixed batch."""
        cfg = self.cfg
        self.started = time.perf_counter()  # total_time_s counts from here
        num_labels = self.train.num_labels if cfg.task == CLASSIFICATION else None  # regression: always one
        self.model, self.tokenizer = load_model(cfg.model, cfg.task, num_labels=num_labels, dtype=self.dtype)
        place(self.model, self.device)
        apply_prompt_format(self.tokenizer, cfg.prompt_format)
        self.log(
            f"model: {cfg.model} loaded in {time.perf_counter() - self.started:.1f}s "
            f"on {self.device} in {precision_name(self.dtype)}"
        )
        self.encode_data()
        self.collate = Collator(self.tokenizer.pad_token_id)
        # Timed before any method is applied; not under torchrun, where the processes share the cores.
        self.latency_batch = None if self.parallel.active else self.collate(self.val_features[: cfg.batch_size])
        with self.autocast():
            self.latency = {"base": forward_latency_ms(self.model, self.latency_batch)} if self.latency_batch else {}
        self.meta = {"task_type": PEFT_TASK_TYPE[cfg.task], "base_model_name_or_path": model_reference(cfg.model)}

    def encode_data(self) -> None:
        """Tokenize the training and validation rows, choose max_length when it is auto, and cut or leave out the
        rows over it (`lorakit.train.long_rows`)."""
        cfg = self.cfg
        try:
            whole_train = encode_whole(self.train, self.tokenizer)
            whole_val = encode_whole(self.validation, self.tokenizer)
            self.max_length = cfg.max_length
            if self.max_length is None:
                lengths = [len(row["input_ids"]) for row in whole_train + whole_val]
                self.max_length = auto_max_length(lengths, model_context(self.model, self.tokenizer))
                self.log(f"max length: {self.max_length} tokens (auto: the longest row, at most the model's context)")
            limited = {}
            for name, split, whole in (
                ("training", self.train, whole_train),
                ("validation", self.validation, whole_val),
            ):
                limited[name] = limit_rows(split, whole, self.tokenizer, self.max_length, cfg.long_rows, name)
                line = describe(limited[name][2], name, self.max_length)
                if line:
                    self.log(line)
        except DataError as err:
            raise RunError(str(err)) from None
        self.train, self.train_features, train_rows = limited["training"]
        self.validation, self.val_features, val_rows = limited["validation"]
        self.data_report = {
            "max_length": self.max_length,
            "long_rows": cfg.long_rows,
            "training": asdict(train_rows),
            "validation": asdict(val_rows),
        }

    def setup_method(self) -> None:
        cfg = self.cfg
        try:
            options = cfg.tuning.method_options(cfg.tuning.lora.lora_config(self.meta))
        except (ValueError, TypeError) as err:
            raise RunError(str(err)) from None
        self.trainable, self.total = apply_tuning(self.model, self.method, options, cfg.quantize, self.log)
        # Master weights: what trains is float32 over a half-precision base (LoRA's factors already are).
        trainable_to_float32(self.model)
        place(self.model, self.device)  # what the method added, wherever it was made

    def write_config(self) -> dict[str, Any]:
        """Write the resolved options; returns the results a resumed run already has."""
        if self.parallel.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / CONFIG_FILE).write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        resuming = self.cfg.resume and latest_checkpoint(self.out) is not None
        results_path = self.out / RESULTS_FILE
        return json.loads(results_path.read_text()) if resuming and results_path.is_file() else {}

    def score_base(self) -> dict[str, float]:
        with disabled(self.model):
            before = self.score("before")
        if self.parallel.is_main:
            write_json(self.out / RESULTS_FILE, {"before": before})
        return before

    def score(self, tag: str) -> dict[str, float]:
        """Metrics on the scored split; rank 0 also writes predictions_<tag>.jsonl."""
        cfg, scored = self.cfg, self.scored
        if not scored.examples:  # --eval-examples 0: no scoring
            return {}
        with self.autocast():
            scores, predictions = evaluate_split(
                self.model,
                self.tokenizer,
                scored,
                self.max_length,
                cfg.max_new_tokens,
                progress=cfg.progress,
                parallel=self.parallel,
                metrics=cfg.metrics,
                decoding=cfg.scoring.decoding(),
            )
        metrics, self.scoring_report = scores.metrics, scores.report()
        if not self.parallel.is_main:
            return metrics
        examples: list[Example | ClassExample] = list(scored.examples)
        rows = [prediction_row(p, e) for p, e in zip(predictions, examples)]
        (self.out / f"predictions_{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.log(f"{tag}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        return metrics

    def summarize(self, before: dict, after: dict, result: TrainResult, memory: PeakRss) -> dict[str, Any]:
        """results.json: the scores, the training figures and what the method costs."""
        if self.latency_batch:
            with self.autocast():
                latency = method_latency(self.model, self.method, self.latency_batch, bool(self.cfg.quantize))
            self.latency.update(latency)
        peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        # What training holds (FSDP's shards, not the whole model that every process loaded first).
        rss_after_training_mb = round(psutil.Process().memory_info().rss / 2**20, 1)
        summary = {
            "before": before,
            "after": after,
            **getattr(self, "scoring_report", {}),  # each metric's implementation, those skipped (if scored)
            "train": {
                "steps": result.steps,
                "final_loss": result.final_loss,
                "wall_time_s": round(result.wall_time_s, 1),
                "tokens_per_s": round(result.tokens_per_s, 1),
                "trainable_parameters": self.trainable,
                "total_parameters": self.total,
                "peak_rss_mb": round(memory.peak_mb, 1),  # while training (sampled), the loaded model included
                "rss_growth_mb": round(memory.peak_mb - memory.start_mb, 1),  # above what was held before training
                "checkpointed_blocks": result.checkpointed_blocks,  # that recomputed activations (--grad-checkpointing)
            },
            "method": self.cfg.method,
            "data": self.data_report,  # the max_length used, and the rows it cut or left out
            "checkpoint_mb": round(weights_bytes(self.out) / 2**20, 3),  # the saved adapter / method weights
            "latency_ms": {k: round(v, 2) for k, v in self.latency.items()},  # one forward pass on a fixed batch
            "peak_rss_mb": peak_rss_mb,
            "rss_after_training_mb": rss_after_training_mb,
            "total_time_s": round(time.perf_counter() - self.started, 1),
        }
        device_peak = peak_memory_mb(self.device)
        if device_peak is not None:  # on CUDA: the largest allocation of the whole run
            summary["peak_device_memory_mb"] = round(device_peak, 1)
        if self.parallel.active:
            gather = self.parallel.gather
            summary["distributed"] = {
                "mode": self.parallel.mode,
                "processes": self.parallel.world,
                "peak_rss_mb_per_process": gather([peak_rss_mb]),
                "rss_after_training_mb_per_process": gather([rss_after_training_mb]),
            }
        if self.parallel.is_main:
            write_json(self.out / RESULTS_FILE, summary)
        return summary
