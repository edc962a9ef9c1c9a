"""One fine-tuning job end to end, as `lorakit train` runs it: resolve the configuration, load model
and data, add the adapter, score the base model, train, score again, and leave in the output folder
the adapter, its resolved config, metrics, a loss curve and the predictions before and after.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

from ..config import LoraConfig
from ..inject import add_adapter, merge, trainable_parameters, unmerge
from ..methods import METHODS, MethodOptions, apply_method, disabled
from ..methods.measure import PeakRss, forward_latency_ms, weights_bytes
from ..atomic import atomic_write
from ..models import BUILTIN_MODELS, load_model, model_reference
from .data import (
    BUILTIN_DATASETS, CLASSIFICATION, GENERATION, Collator, DataError, DataSplit, encode_causal,
    encode_classification, load_data,
)
from .evaluate import evaluate_split, mean_loss
from .distributed import Parallel, init_parallel, shutdown
from .loop import LoopSettings, latest_checkpoint, train_adapter

CONFIG_FILE = "train_config.yaml"
RESULTS_FILE = "results.json"
DEFAULT_MODEL = {GENERATION: "smollm2-135m", CLASSIFICATION: "minilm-l6"}
PEFT_TASK_TYPE = {GENERATION: "CAUSAL_LM", CLASSIFICATION: "SEQ_CLS"}
# Keys that may differ between a run and its resumption.
_RESUME_FREE = {"resume", "overwrite", "progress", "tensorboard", "eval_every", "save_every", "log_every",
                "distributed", "dist_timeout"}


class RunError(ValueError):
    """A training job that cannot start as configured; the message is one line for the user."""


@dataclass
class RunConfig:
    model: str | None = None  # default: smollm2-135m for causal-lm, minilm-l6 for seq-cls
    data: str = "e2e"
    task: str | None = None  # default: the data set's (built-ins) or the model's
    input_field: str | None = None
    target_field: str | None = None
    pair_field: str | None = None
    template: str | None = None
    method: str = "lora"  # or full, bitfit, adapter, prefix, prompt, head (lorakit.methods)
    adapter_size: int = 64  # method adapter: bottleneck width
    adapter_norms: bool = False  # method adapter: also train the layer norms (Houlsby et al.)
    prefix_length: int = 10  # method prefix: key/value positions per layer
    prompt_length: int = 10  # method prompt: soft-prompt embeddings
    target_modules: list[str] | None = None  # default: the built-in model's, else all-linear
    quantize: str | None = None  # QLoRA: freeze the base's linear layers in "nf4" (double-quantized) or "int8"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    init: str = "kaiming"  # or gaussian, pissa, olora (LoraConfig.init)
    use_rslora: bool = False  # scaling alpha/sqrt(r)
    use_dora: bool = False  # weight-decomposed LoRA
    loraplus_ratio: float | None = None  # LoRA+: learning rate of B = lr * ratio
    lr: float = 1e-3
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    output: str | None = None  # default: runs/<data>-<model>
    max_train_examples: int | None = None
    eval_examples: int | None = 50  # examples scored before/after (None: the whole split)
    val_examples: int = 64  # held-out examples for the periodic eval loss
    max_new_tokens: int = 64
    eval_every: int | None = 25  # steps between validation-loss evaluations (None: only at the end)
    save_every: int | None = 50
    log_every: int = 5
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    tensorboard: bool = False
    group_by_length: bool = True  # micro-batches of similar lengths (less padding); off: plain shuffled order
    distributed: str | None = None  # "ddp" or "fsdp" under torchrun (several processes alone mean ddp)
    dist_timeout: float = 600.0  # seconds a collective may wait for a process before failing

    @classmethod
    def from_sources(cls, file: str | os.PathLike | None = None, **overrides: Any) -> "RunConfig":
        """Defaults, then the YAML file's keys, then the overrides that are not None."""
        values: dict[str, Any] = {}
        if file is not None:
            path = Path(file)
            if not path.is_file():
                raise RunError(f"config file not found: {path}")
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise RunError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
            if not isinstance(loaded, dict):
                raise RunError(f"{path} must hold a mapping of option names to values")
            values.update({k.replace("-", "_"): v for k, v in loaded.items()})
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise RunError(f"unknown option(s) {', '.join(unknown)}")
        return cls(**values)

    def resolved(self) -> "RunConfig":
        """Fill every default that depends on other options."""
        task = self.task
        if task is None:
            builtin_data = BUILTIN_DATASETS.get(self.data.removesuffix("-full"))
            builtin_model = BUILTIN_MODELS.get(self.model or "")
            task = builtin_data.task if builtin_data else (builtin_model.task if builtin_model else GENERATION)
        if task not in (GENERATION, CLASSIFICATION):
            raise RunError(f"unknown task {task!r}; expected {GENERATION} or {CLASSIFICATION}")
        model = self.model or DEFAULT_MODEL[task]
        builtin = BUILTIN_MODELS.get(model)
        targets = self.target_modules or (list(builtin.target_modules) if builtin else None)
        name = f"{Path(self.data).stem}-{Path(model).name}"
        return dataclasses.replace(
            self, task=task, model=model, target_modules=targets, output=self.output or str(Path("runs") / name)
        )


def _check_output(cfg: RunConfig) -> Path:
    out = Path(cfg.output)
    previous_file = out / CONFIG_FILE
    if out.exists() and not out.is_dir():
        raise RunError(f"output {out} exists and is not a folder")
    if not previous_file.is_file():
        if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
            raise RunError(f"output folder {out} is not empty and holds no lorakit run; pick another or pass --overwrite")
        return out
    previous = yaml.safe_load(previous_file.read_text()) or {}
    if cfg.resume:
        current = dataclasses.asdict(cfg)
        defaults = dataclasses.asdict(RunConfig())  # a run written before an option existed used its default
        changed = sorted(k for k in current if k not in _RESUME_FREE and previous.get(k, defaults[k]) != current[k])
        if changed:
            raise RunError(f"--resume: {out} holds a run with different {', '.join(changed)}; resume with the same options")
        return out
    if not cfg.overwrite:
        raise RunError(f"output folder {out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


def _load_splits(cfg: RunConfig) -> tuple[DataSplit, DataSplit, DataSplit]:
    """(train, validation for the eval loss, evaluation set scored before/after)."""
    fields = dict(input_field=cfg.input_field, target_field=cfg.target_field, pair_field=cfg.pair_field,
                  template=cfg.template)
    name = cfg.data.removesuffix("-full")
    train = load_data(cfg.data, "train", cfg.task, **fields)
    if name in BUILTIN_DATASETS:
        validation = load_data(cfg.data, "validation", cfg.task, **fields)
        scored = load_data(cfg.data, "test" if "test" in BUILTIN_DATASETS[name].files else "validation", cfg.task, **fields)
    else:
        # A single local file: hold out a seeded tenth (at most 200 rows) for evaluation.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        held = max(1, min(200, len(train) // 10))
        if len(train) < 2:
            raise RunError(f"{cfg.data}: {len(train)} example(s) is too few to train and evaluate on")
        pick = lambda idx: dataclasses.replace(train, examples=[train.examples[i] for i in idx])  # noqa: E731
        validation = scored = pick(order[:held])
        train = pick(order[held:])
    if cfg.max_train_examples is not None:
        train = dataclasses.replace(train, examples=train.examples[: cfg.max_train_examples])
    if cfg.eval_examples is not None:
        scored = dataclasses.replace(scored, examples=scored.examples[: cfg.eval_examples])
    validation = dataclasses.replace(validation, examples=validation.examples[: cfg.val_examples])
    return train, validation, scored


def _encode(split: DataSplit, tokenizer, max_length: int) -> list[dict]:
    encode = encode_causal if split.task == GENERATION else encode_classification
    return [encode(tokenizer, example, max_length) for example in split.examples]


def _head_names(model) -> list[str]:
    """The classification head(s) to train in full beside the adapter."""
    return [name for name in ("classifier", "score") if hasattr(model, name)]


def run_training(cfg: RunConfig, log=print) -> dict[str, Any]:
    """Run one job; returns the summary written to results.json.

    Under torchrun every process runs this: all load the data and model (with the same seed, so the
    adapter starts identical everywhere), split the work, and only rank 0 logs and writes files.
    """
    cfg = cfg.resolved()
    parallel = init_parallel(cfg.distributed, cfg.dist_timeout)
    try:
        return _run(cfg, parallel, log if parallel.is_main else (lambda message: None))
    finally:
        shutdown(parallel)


def _run(cfg: RunConfig, parallel: Parallel, log) -> dict[str, Any]:
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise RunError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if cfg.method not in METHODS:
        raise RunError(f"unknown method {cfg.method!r}; expected one of: {', '.join(METHODS)}")
    if cfg.quantize and cfg.method != "lora":
        raise RunError(f"--quantize freezes the base for LoRA (QLoRA); it does not combine with --method {cfg.method}")
    out = _check_output(cfg)
    parallel.barrier()  # every process has checked the folder before rank 0 writes into it
    if parallel.active:
        log(f"distributed: {parallel.mode} over {parallel.world} processes")
    _seed_everything(cfg.seed)
    try:
        train, validation, scored = _load_splits(cfg)
    except DataError as err:
        raise RunError(str(err)) from None
    log(f"data: {cfg.data} ({cfg.task}) — {len(train)} training, {len(validation)} validation, {len(scored)} scored examples")

    started = time.perf_counter()
    model, tokenizer = load_model(cfg.model, cfg.task, num_labels=train.num_labels if cfg.task == CLASSIFICATION else None)
    log(f"model: {cfg.model} loaded in {time.perf_counter() - started:.1f}s")
    try:
        train_features = _encode(train, tokenizer, cfg.max_length)
        val_features = _encode(validation, tokenizer, cfg.max_length)
    except DataError as err:
        raise RunError(str(err)) from None

    collate = Collator(tokenizer.pad_token_id)
    # Latency is measured on one fixed batch, also on the base model (before any method is applied).
    latency_batch = collate(val_features[: cfg.batch_size]) if not parallel.active else None
    latency = {"base": forward_latency_ms(model, latency_batch)} if latency_batch else {}
    meta = {"task_type": PEFT_TASK_TYPE[cfg.task], "base_model_name_or_path": model_reference(cfg.model)}
    if cfg.method == "lora":
        lora = LoraConfig(
            r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules or "all-linear",
            modules_to_save=_head_names(model) if cfg.task == CLASSIFICATION else None,
            init=cfg.init, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, **meta,
        )
        if cfg.quantize:
            from ..quant import quantize

            try:  # the default skip list keeps the output head and classification heads (trained in full) in float
                log(quantize(model, cfg.quantize).summary())
            except ValueError as err:
                raise RunError(str(err)) from None
        try:
            add_adapter(model, lora)
        except (ValueError, TypeError) as err:
            raise RunError(str(err)) from None
        described = f"adapter: r={cfg.r} alpha={cfg.alpha} on {lora.target_modules}"
    else:
        options = MethodOptions(adapter_size=cfg.adapter_size, adapter_norms=cfg.adapter_norms,
                                prefix_length=cfg.prefix_length, prompt_length=cfg.prompt_length)
        try:
            apply_method(model, cfg.method, options)
        except ValueError as err:
            raise RunError(f"--method {cfg.method}: {err}") from None
        described = f"method: {cfg.method}"
    trainable, total = trainable_parameters(model)
    log(f"{described} — {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")

    if parallel.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    resuming = cfg.resume and latest_checkpoint(out) is not None
    results_path = out / RESULTS_FILE
    previous = json.loads(results_path.read_text()) if resuming and results_path.is_file() else {}

    def score(tag: str) -> dict[str, float]:
        if not scored.examples:  # --eval-examples 0: no scoring
            return {}
        metrics, predictions = evaluate_split(model, tokenizer, scored, cfg.max_length, cfg.max_new_tokens,
                                              progress=cfg.progress, parallel=parallel)
        if not parallel.is_main:
            return metrics
        rows = [{"prediction": p, **({"prompt": e.prompt, "references": e.references} if cfg.task == GENERATION
                                     else {"label": e.label})} for p, e in zip(predictions, scored.examples)]
        (out / f"predictions_{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        log(f"{tag}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        return metrics

    if "before" in previous:
        before = previous["before"]
    else:
        with disabled(model):
            before = score("before")
        if parallel.is_main:
            _write_json(results_path, {"before": before})

    settings = LoopSettings(
        lr=cfg.lr, epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, seed=cfg.seed, log_every=cfg.log_every,
        eval_every=cfg.eval_every, save_every=cfg.save_every, progress=cfg.progress,
        loraplus_ratio=cfg.loraplus_ratio, tensorboard=cfg.tensorboard, group_by_length=cfg.group_by_length,
    )
    with PeakRss() as memory:
        result = train_adapter(
            model, train_features, collate, settings, out,
            evaluate=lambda m: {"eval_loss": mean_loss(m, val_features, collate, parallel=parallel)},
            resume=cfg.resume, adapter_meta=meta, parallel=parallel,
        )
    after = score("after")
    if latency_batch:
        latency[cfg.method] = forward_latency_ms(model, latency_batch)
        if cfg.method == "lora" and not cfg.quantize:  # merged, LoRA runs as fast as the base
            merge(model)
            latency["lora_merged"] = forward_latency_ms(model, latency_batch)
            unmerge(model)
    peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    # What training holds (FSDP's shards, not the whole model that every process loaded first).
    rss_after_training_mb = round(psutil.Process().memory_info().rss / 2**20, 1)
    summary = {
        "before": before,
        "after": after,
        "train": {
            "steps": result.steps,
            "final_loss": result.final_loss,
            "wall_time_s": round(result.wall_time_s, 1),
            "tokens_per_s": round(result.tokens_per_s, 1),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "peak_rss_mb": round(memory.peak_mb, 1),  # while training (sampled), the loaded model included
            "rss_growth_mb": round(memory.peak_mb - memory.start_mb, 1),  # above what was held before training
        },
        "method": cfg.method,
        "checkpoint_mb": round(weights_bytes(out) / 2**20, 3),  # the saved adapter / method weights
        "latency_ms": {k: round(v, 2) for k, v in latency.items()},  # one forward pass on a fixed batch
        "peak_rss_mb": peak_rss_mb,
        "rss_after_training_mb": rss_after_training_mb,
        "total_time_s": round(time.perf_counter() - started, 1),
    }
    if parallel.active:
        summary["distributed"] = {"mode": parallel.mode, "processes": parallel.world,
                                  "peak_rss_mb_per_process": parallel.gather([peak_rss_mb]),
                                  "rss_after_training_mb_per_process": parallel.gather([rss_after_training_mb])}
    if parallel.is_main:
        _write_json(results_path, summary)
    return summary
