"""The `lorakit` command line: train, eval, generate, merge, combine, info.

Each command is a thin layer over the library: it parses options, calls one function, and turns the
library's specific errors into a one-line message and a non-zero exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Low-Rank Adaptation of transformer models.")
console = Console()
err_console = Console(stderr=True)

# The errors the library raises for bad input: shown as one line, never as a traceback.
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError)


def _fail(err: BaseException) -> None:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _split_list(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file with any of these options; flags override it")] = None,
    model: Annotated[Optional[str], typer.Option(help="built-in name (smollm2-135m, minilm-l6), local folder or .gguf, or hub id")] = None,
    data: Annotated[Optional[str], typer.Option(help="built-in (e2e, sst2, mrpc, or <name>-full), a .jsonl/.json/.csv/.tsv file, or hf:<id>")] = None,
    task: Annotated[Optional[str], typer.Option(help="causal-lm or seq-cls (default: from the data or model)")] = None,
    input_field: Annotated[Optional[str], typer.Option(help="field holding the input text")] = None,
    target_field: Annotated[Optional[str], typer.Option(help="field holding the target text or label")] = None,
    pair_field: Annotated[Optional[str], typer.Option(help="second text field for sentence-pair classification")] = None,
    template: Annotated[Optional[str], typer.Option(help="prompt template with {field} placeholders")] = None,
    target_modules: Annotated[Optional[str], typer.Option(help="comma-separated module names, or all-linear")] = None,
    quantize: Annotated[Optional[str], typer.Option(help="QLoRA: quantize the frozen base's linear layers: nf4 (4-bit, double-quantized), int8 or int8-asym")] = None,
    r: Annotated[Optional[int], typer.Option("--r", "--lora-rank", help="LoRA rank (write --lora-rank under torchrun, whose own options swallow --r)")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (update scaled by alpha/r)")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="dropout on the LoRA input")] = None,
    init: Annotated[Optional[str], typer.Option(help="kaiming, gaussian, pissa (A, B from W0's top singular vectors) or olora (QR)")] = None,
    use_rslora: Annotated[Optional[bool], typer.Option("--use-rslora/--no-use-rslora", help="rsLoRA: scale by alpha/sqrt(r) instead of alpha/r")] = None,
    use_dora: Annotated[Optional[bool], typer.Option("--use-dora/--no-use-dora", help="DoRA: weight-decomposed LoRA (a trained magnitude per output feature)")] = None,
    loraplus_ratio: Annotated[Optional[float], typer.Option(help="LoRA+: train B with lr × this ratio (e.g. 16)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="peak learning rate")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="passes over the training data")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="optimizer steps (overrides --epochs)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="examples per micro-batch")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="micro-batches per optimizer step")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="maximum tokens per example")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed for initialisation, data order and dropout")] = None,
    output: Annotated[Optional[str], typer.Option(help="output folder (default runs/<data>-<model>)")] = None,
    max_train_examples: Annotated[Optional[int], typer.Option(help="use only the first N training examples")] = None,
    eval_examples: Annotated[Optional[int], typer.Option(help="examples scored before and after training")] = None,
    val_examples: Annotated[Optional[int], typer.Option(help="held-out examples for the validation loss")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="generation length when scoring")] = None,
    warmup_ratio: Annotated[Optional[float], typer.Option(help="fraction of steps with a rising learning rate")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay")] = None,
    log_every: Annotated[Optional[int], typer.Option(help="steps between metrics-log lines")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="steps between validation-loss evaluations")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="steps between checkpoints")] = None,
    distributed: Annotated[Optional[str], typer.Option(help="ddp or fsdp, under torchrun (several processes alone mean ddp)")] = None,
    dist_timeout: Annotated[Optional[float], typer.Option(help="seconds a process waits for the others before failing")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the last checkpoint in --output")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a run already in --output")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="also log to <output>/tensorboard")] = False,
) -> None:
    """Fine-tune a model with LoRA. With no options: SmolLM2-135M-Instruct on E2E NLG (about 10 minutes on 2 CPU cores)."""
    options = {k: v for k, v in locals().items() if k not in ("config", "quiet", "resume", "overwrite")}
    from .train.run import RunConfig, run_training

    options["target_modules"] = _split_list(target_modules)
    options.update(resume=resume or None, overwrite=overwrite or None, progress=False if quiet else None,
                   tensorboard=tensorboard or None)
    try:
        cfg = RunConfig.from_sources(config, **options)
        summary = run_training(cfg, log=lambda msg: console.print(msg, highlight=False))
    except _USER_ERRORS as err:
        _fail(err)
    except KeyboardInterrupt:
        err_console.print("interrupted: a checkpoint of the last finished step was written; continue with --resume")
        raise typer.Exit(130) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one report
        _print_before_after(summary)
        console.print(f"adapter and logs written to [bold]{cfg.resolved().output}[/]")


def _print_before_after(summary: dict) -> None:
    table = Table(title="held-out scores")
    table.add_column("metric")
    table.add_column("base model", justify="right")
    table.add_column("with adapter", justify="right")
    for key, value in summary["after"].items():
        table.add_row(key, f"{summary['before'].get(key, float('nan')):.2f}", f"{value:.2f}")
    console.print(table)
    t = summary["train"]
    console.print(
        f"{t['steps']} steps in {t['wall_time_s']:.0f}s ({t['tokens_per_s']:.0f} tokens/s), final loss "
        f"{t['final_loss']:.4f}; peak memory {summary['peak_rss_mb']:.0f} MB; total {summary['total_time_s']:.0f}s"
    )


def _load_with_adapters(model: Optional[str], adapters: list[Path], task: Optional[str] = None,
                        names: Optional[list[str]] = None):
    """Base model (given, or named in the first adapter) with every adapter loaded and active (named by
    `names`, else by their folder names)."""
    import lorakit
    from .models import load_model

    configs = [lorakit.read_adapter(a) for a in adapters]
    if model is None:
        if not configs or not configs[0][0].base_model_name_or_path:
            raise ValueError("--model is required (the adapter does not name its base model)")
        model = configs[0][0].base_model_name_or_path
    seq_cls = task == "seq-cls" or (task is None and configs and configs[0][0].task_type == "SEQ_CLS")
    num_labels = None
    if seq_cls:
        heads = [t for _, tensors in configs for k, t in tensors.items() if k.endswith(("classifier.weight", "score.weight"))]
        num_labels = heads[0].shape[0] if heads else None
    task = "seq-cls" if seq_cls else "causal-lm"
    base, tokenizer = load_model(model, task, num_labels=num_labels)
    names = list(names) if names else [folder.resolve().name.replace(".", "_") or "default" for folder in adapters]
    for folder, name in zip(adapters, names):
        lorakit.load_adapter(base, folder, name=name)
    if names:
        lorakit.set_adapter(base, names)
    return base, tokenizer, task


@app.command("eval")
def eval_(
    model: Annotated[Optional[str], typer.Option(help="base model (default: the one the adapter names)")] = None,
    adapter: Annotated[Optional[list[Path]], typer.Option(help="adapter folder (repeat for several)")] = None,
    data: Annotated[Optional[str], typer.Option(help="data set, as for train (default: the adapter's training data, else e2e)")] = None,
    split: Annotated[str, typer.Option(help="train, validation or test (test falls back to validation)")] = "test",
    input_field: Annotated[Optional[str], typer.Option()] = None,
    target_field: Annotated[Optional[str], typer.Option()] = None,
    pair_field: Annotated[Optional[str], typer.Option()] = None,
    template: Annotated[Optional[str], typer.Option()] = None,
    limit: Annotated[Optional[int], typer.Option(help="score only the first N examples")] = None,
    max_length: Annotated[int, typer.Option()] = 256,
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    output: Annotated[Optional[Path], typer.Option(help="write metrics and predictions as JSON here")] = None,
) -> None:
    """Score a model (with adapters) on a data split: accuracy/F1/MCC or BLEU/NIST/chrF/ROUGE-L.

    Data options left out are taken from the first adapter's train_config.yaml when it has one.
    """
    import dataclasses

    import yaml

    from .train.data import BUILTIN_DATASETS, load_data
    from .train.evaluate import evaluate_split
    from .train.run import CONFIG_FILE

    run_file = adapter[0] / CONFIG_FILE if adapter else None
    trained_with = yaml.safe_load(run_file.read_text()) if run_file and run_file.is_file() else {}
    given = {"data": data, "input_field": input_field, "target_field": target_field, "pair_field": pair_field,
             "template": template}
    fields = {k: v if v is not None else trained_with.get(k) for k, v in given.items()}
    data = fields.pop("data") or "e2e"
    try:
        builtin = BUILTIN_DATASETS.get(data.removesuffix("-full"))
        if builtin is not None and split == "test" and "test" not in builtin.files:
            split = "validation"
        base, tokenizer, task = _load_with_adapters(model, adapter or [], builtin.task if builtin else trained_with.get("task"))
        dataset = load_data(data, split, task, **fields)
        if limit is not None:
            dataset = dataclasses.replace(dataset, examples=dataset.examples[:limit])
        metrics, predictions = evaluate_split(base, tokenizer, dataset, max_length, max_new_tokens, progress=True)
    except _USER_ERRORS as err:
        _fail(err)
    table = Table(title=f"{data} / {split} ({len(dataset)} examples)")
    table.add_column("metric")
    table.add_column("score", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.2f}")
    console.print(table)
    if output:
        output.write_text(json.dumps({"metrics": metrics, "predictions": predictions}, indent=2))


@app.command()
def generate(
    prompt: Annotated[Optional[list[str]], typer.Argument(help="prompt text(s)")] = None,
    model: Annotated[Optional[str], typer.Option(help="base model (default: the one the adapter names)")] = None,
    adapter: Annotated[Optional[list[Path]], typer.Option(help="adapter folder; repeat to combine several (their updates add)")] = None,
    file: Annotated[Optional[Path], typer.Option(help="a file with one prompt per line")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding")] = 0.0,
    raw: Annotated[bool, typer.Option("--raw", help="feed the prompt as is, without the chat template")] = False,
) -> None:
    """Generate text from a model with one or several adapters."""
    from .generate import generate_texts
    from .train.data import format_prompt

    prompts = list(prompt or [])
    try:
        if file is not None:
            if not file.is_file():
                raise FileNotFoundError(f"prompt file not found: {file}")
            prompts += [line for line in file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError("give a prompt or --file")
        base, tokenizer, _ = _load_with_adapters(model, adapter or [], "causal-lm")
        inputs = prompts if raw else [format_prompt(tokenizer, p) for p in prompts]
        texts = generate_texts(base, tokenizer, inputs, max_new_tokens, temperature=temperature)
    except _USER_ERRORS as err:
        _fail(err)
    for text in texts:
        print(text)


@app.command()
def merge(
    adapter: Annotated[Path, typer.Option(help="adapter folder")],
    output: Annotated[Path, typer.Option(help="folder for the standalone merged checkpoint")],
    model: Annotated[Optional[str], typer.Option(help="base model (default: the one the adapter names)")] = None,
) -> None:
    """Fold an adapter into its base model and save a plain transformers checkpoint (no lorakit needed to load it)."""
    import lorakit

    try:
        if output.exists() and any(output.iterdir()):
            raise ValueError(f"output folder {output} is not empty")
        base, tokenizer, _ = _load_with_adapters(model, [adapter])
        merged = lorakit.merge_and_unload(base)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
        try:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if output.exists():
                output.rmdir()
            os.replace(tmp, output)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except _USER_ERRORS as err:
        _fail(err)
    console.print(f"merged model written to [bold]{output}[/]")


@app.command("combine")
def combine_(
    adapter: Annotated[list[str], typer.Option(help="NAME=FOLDER of an adapter to combine (repeat the option)")],
    output: Annotated[Path, typer.Option(help="folder for the combined adapter")],
    weights: Annotated[Optional[str], typer.Option(help="NAME=WEIGHT,... (default: 1 for each adapter)")] = None,
    method: Annotated[str, typer.Option(help="cat (exact weighted sum), linear, svd or ties")] = "cat",
    rank: Annotated[Optional[int], typer.Option(help="rank of the result for svd and ties (default: the largest input rank)")] = None,
    density: Annotated[float, typer.Option(help="ties: fraction of each update's entries kept before the sign election")] = 0.2,
    model: Annotated[Optional[str], typer.Option(help="base model (default: the one the first adapter names)")] = None,
) -> None:
    """Combine adapters into one (weighted): lorakit combine --adapter a=runs/a --adapter b=runs/b --weights a=0.7,b=0.3 --output mix"""
    import lorakit

    try:
        pairs = [item.split("=", 1) for item in adapter]
        if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
            raise ValueError(f"--adapter takes NAME=FOLDER, got {adapter}")
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must differ, got {names}")
        mix = {name: 1.0 for name in names}
        for item in _split_list(weights) or []:
            name, _, value = item.partition("=")
            if name not in mix:
                raise ValueError(f"--weights names {name!r}, which is not one of the adapters {names}")
            try:
                mix[name] = float(value)
            except ValueError:
                raise ValueError(f"--weights: {item!r} is not NAME=NUMBER") from None
        if output.exists() and any(output.iterdir()):
            raise ValueError(f"output folder {output} is not empty")
        base, _, _ = _load_with_adapters(model, [Path(folder) for _, folder in pairs], names=names)
        lorakit.combine(base, mix, method=method, name="combined", rank=rank, density=density)
        lorakit.save_adapter(base, output, name="combined")
        config = lorakit.adapter_config(base, "combined")
    except (*_USER_ERRORS, RuntimeError) as err:
        _fail(err)
    weights_text = ", ".join(f"{n}×{w:g}" for n, w in mix.items())
    console.print(f"{method} of {weights_text} (rank {config.r}) written to [bold]{output}[/]")


@app.command()
def info(adapter: Annotated[Path, typer.Argument(help="adapter folder")]) -> None:
    """An adapter folder's config, size, targets and parameter table."""
    import lorakit
    from .io import WEIGHTS_NAME

    try:
        config, tensors = lorakit.read_adapter(adapter)
    except _USER_ERRORS as err:
        _fail(err)
    weights = adapter / WEIGHTS_NAME
    size = weights.stat().st_size if weights.is_file() else 0
    console.print(f"[bold]{adapter}[/]  {size / 1e6:.2f} MB, {sum(t.numel() for t in tensors.values()):,} parameters")
    console.print(
        f"base model: {config.base_model_name_or_path or '?'}   task: {config.task_type or '?'}   "
        f"r={config.r} alpha={config.alpha} dropout={config.dropout} bias={config.bias}"
    )
    table = Table()
    for column in ("module", "count", "shapes", "parameters"):
        table.add_column(column, justify="right" if column in ("count", "parameters") else "left")
    groups: dict[str, list] = {}
    for key, tensor in tensors.items():
        parts = key.split(".")
        kind = next((p for p in parts if p.startswith("lora_")), None)
        module = parts[parts.index(kind) - 1] if kind else parts[-2] if len(parts) > 1 else key
        groups.setdefault(f"{module}.{kind}" if kind else module, []).append(tensor)
    for name, group in sorted(groups.items()):
        shapes = sorted({"×".join(map(str, t.shape)) for t in group})
        table.add_row(name, str(len(group)), ", ".join(shapes), f"{sum(t.numel() for t in group):,}")
    console.print(table)


@app.command("estimate")
def estimate_(
    model: Annotated[str, typer.Option(help="built-in name, folder with config.json, JSON config file, .gguf, or hub id")],
    method: Annotated[str, typer.Option(help="full, lora, qlora, adapter, prefix, prompt or bitfit")] = "lora",
    compare: Annotated[bool, typer.Option("--compare", help="every method side by side")] = False,
    r: Annotated[int, typer.Option("--r", help="LoRA rank")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha")] = 16.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout")] = 0.05,
    target_modules: Annotated[Optional[str], typer.Option(help="comma-separated module names, or all-linear (default: the built-in's, else all-linear)")] = None,
    quantize: Annotated[Optional[str], typer.Option(help="frozen base in nf4 or int8 (qlora implies nf4)")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    optimizer: Annotated[str, typer.Option(help="adamw or sgd (with momentum)")] = "adamw",
    batch_size: Annotated[int, typer.Option(help="examples per micro-batch")] = 8,
    max_length: Annotated[int, typer.Option(help="tokens per example")] = 256,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing", help="recompute activations in the backward pass")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda: which attention kernels and optimizer implementation to assume")] = "cpu",
    task: Annotated[Optional[str], typer.Option(help="causal-lm or seq-cls (default: from the model)")] = None,
    adapter_size: Annotated[int, typer.Option(help="bottleneck size k of adapters")] = 64,
    prefix_length: Annotated[int, typer.Option(help="prefix-tuning positions per layer")] = 30,
    prompt_length: Annotated[int, typer.Option(help="prompt-tuning virtual tokens")] = 20,
    tflops: Annotated[Optional[float], typer.Option(help="sustained TFLOP/s of your hardware, to show the time per step")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Memory, adapter size and FLOPs of a training step, from the model's config alone (no weights loaded)."""
    from .estimation import compare as compare_methods
    from .estimation import estimate as estimate_one
    from .estimation import report

    options = dict(task=task, r=r, alpha=alpha, dropout=dropout, target_modules=_split_list(target_modules) or None,
                   quantize=quantize, dtype=dtype, optimizer=optimizer, batch_size=batch_size, max_length=max_length,
                   grad_checkpointing=grad_checkpointing, device=device, adapter_size=adapter_size,
                   prefix_length=prefix_length, prompt_length=prompt_length)
    if options["target_modules"] == ["all-linear"]:
        options["target_modules"] = "all-linear"
    try:
        results = compare_methods(model, **options) if compare else [estimate_one(model, method, **options)]
        if not any(not isinstance(e, str) for e in results):
            raise ValueError("no method applies: " + "; ".join(results))
    except _USER_ERRORS as err:
        _fail(err)
    if as_json:
        items = [e.to_dict() if not isinstance(e, str) else {"method": e.split(":", 1)[0], "error": e}
                 for e in results]
        print(json.dumps(items if compare else items[0], indent=2))
        return
    grid = report.table(results, tflops)
    # Wider than the terminal rather than squeezed into unreadable cells (a pipe gets 80 columns).
    Console(width=max(console.width, report.natural_width(console, grid))).print(grid)
    for line in report.footnotes(results):
        console.print(line, highlight=False)


def main() -> None:
    app(prog_name="lorakit")
