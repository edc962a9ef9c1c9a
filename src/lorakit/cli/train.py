"""`lorakit train`, `lorakit eval` and `lorakit generate`: fine-tune, score, and sample."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import USER_ERRORS, app, console, err_console, fail, load_with_adapters, split_list


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
    method: Annotated[Optional[str], typer.Option(help="lora (default), full, bitfit, adapter, prefix, prompt or head (linear probing)")] = None,
    adapter_size: Annotated[Optional[int], typer.Option(help="--method adapter: bottleneck width (64)")] = None,
    adapter_norms: Annotated[Optional[bool], typer.Option("--adapter-norms/--no-adapter-norms", help="--method adapter: also train the layer norms")] = None,
    prefix_length: Annotated[Optional[int], typer.Option(help="--method prefix: key/value positions per layer (10)")] = None,
    prompt_length: Annotated[Optional[int], typer.Option(help="--method prompt: soft-prompt embeddings (10)")] = None,
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
    group_by_length: Annotated[Optional[bool], typer.Option("--group-by-length/--no-group-by-length", help="batch examples of similar length together (default: on)")] = None,
) -> None:
    """Fine-tune a model with LoRA (or another method: --method). With no options: SmolLM2-135M-Instruct on E2E NLG (about 8 minutes on 2 CPU cores)."""
    options = {k: v for k, v in locals().items() if k not in ("config", "quiet", "resume", "overwrite")}
    from ..train.run import RunConfig, run_training

    options["target_modules"] = split_list(target_modules)
    options.update(resume=resume or None, overwrite=overwrite or None, progress=False if quiet else None,
                   tensorboard=tensorboard or None)
    try:
        cfg = RunConfig.from_sources(config, **options)
        summary = run_training(cfg, log=lambda msg: console.print(msg, highlight=False))
    except USER_ERRORS as err:
        fail(err)
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

    from ..train.data import BUILTIN_DATASETS, load_data
    from ..train.evaluate import evaluate_split
    from ..train.run import CONFIG_FILE

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
        base, tokenizer, task = load_with_adapters(model, adapter or [], builtin.task if builtin else trained_with.get("task"))
        dataset = load_data(data, split, task, **fields)
        if limit is not None:
            dataset = dataclasses.replace(dataset, examples=dataset.examples[:limit])
        metrics, predictions = evaluate_split(base, tokenizer, dataset, max_length, max_new_tokens, progress=True)
    except USER_ERRORS as err:
        fail(err)
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
    from ..generate import generate_texts
    from ..train.data import format_prompt

    prompts = list(prompt or [])
    try:
        if file is not None:
            if not file.is_file():
                raise FileNotFoundError(f"prompt file not found: {file}")
            prompts += [line for line in file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError("give a prompt or --file")
        base, tokenizer, _ = load_with_adapters(model, adapter or [], "causal-lm")
        inputs = prompts if raw else [format_prompt(tokenizer, p) for p in prompts]
        texts = generate_texts(base, tokenizer, inputs, max_new_tokens, temperature=temperature)
    except USER_ERRORS as err:
        fail(err)
    for text in texts:
        print(text)
