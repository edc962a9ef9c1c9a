"""`lorakit train`, `lorakit eval` and `lorakit generate`: fine-tune, score (`lorakit.metrics`), and sample. Their
options that a training run has too are generated from the run's config fields (`lorakit.train.config`)."""

from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.markup import escape
from rich.table import Table

from ..device import autocast
from ..generate import Decoding, generate_texts
from ..metrics import Scores
from ..train import run as run_module
from ..train.config import SECTION_PATHS, RunConfig, flatten
from ..train.data import BUILTIN_DATASETS, apply_prompt_format, format_prompt, load_data, prompt_defaults
from ..train.evaluate import evaluate_split
from ..train.sections import DataSection, ScoringSection
from .common import (
    USER_ERRORS,
    AdapterFolders,
    DeviceOption,
    ModelOfAdapter,
    PrecisionOption,
    Target,
    app,
    console,
    err_console,
    fail,
    load_with_adapters,
)
from .options import given, options_of, with_options

CONFIG_HELP = (
    "YAML file with any of these options, by name or in sections ("
    + ", ".join(".".join(path) for path in sorted(SECTION_PATHS))
    + "); flags override it"
)


@app.command()
@with_options(options_of(RunConfig(), panels=True))
def train(
    config: Annotated[Path | None, typer.Option("--config", help=CONFIG_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars (as --no-progress)")] = False,
    **options: Any,
) -> None:
    """Fine-tune a model with LoRA (or another method: --method). With no options: SmolLM2-135M-Instruct on E2E NLG
    (about 14 minutes on 2 CPU cores)."""
    values = given(RunConfig(), options)
    if quiet:
        values["progress"] = False
    try:
        cfg = RunConfig.from_sources(config, **values)
        summary = run_module.run_training(cfg, log=lambda msg: console.print(msg, highlight=False))
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
    _print_skipped(summary.get("skipped_metrics", {}))
    t = summary["train"]
    console.print(
        f"{t['steps']} steps in {t['wall_time_s']:.0f}s ({t['tokens_per_s']:.0f} tokens/s), final loss "
        f"{t['final_loss']:.4f}; peak memory {summary['peak_rss_mb']:.0f} MB; total {summary['total_time_s']:.0f}s"
    )


RUN_DATA = ("data", "columns", "input_field", "target_field", "pair_field", "template")  # what eval takes from the run


SCORING = tuple(f.name for f in fields(ScoringSection))  # eval also takes these from the run when not given


def _print_skipped(skipped: dict[str, str]) -> None:
    for name, reason in skipped.items():
        console.print(f"[yellow]{name} not computed:[/] {escape(reason)}", highlight=False)  # "[coco]" is not markup


def _print_scores(title: str, scores: Scores) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("score", justify="right")
    for key, value in scores.metrics.items():
        table.add_row(key, f"{value:.2f}")
    console.print(table)
    _print_skipped(scores.skipped)


def _trained_with(adapters: list[Path] | None) -> dict[str, Any]:
    """The options the first adapter was trained with (its run's train_config.yaml, flat), or none."""
    run_file = adapters[0] / run_module.CONFIG_FILE if adapters else None
    return flatten(yaml.safe_load(run_file.read_text()) or {}) if run_file and run_file.is_file() else {}


def _run_prompt_format(trained_with: dict[str, Any]) -> str | None:
    """The prompt format of the run an adapter comes from ("chat" for runs from before the option), if any."""
    return (trained_with.get("prompt_format") or "chat") if trained_with else None


def _data_options(chosen: dict[str, Any], trained_with: dict[str, Any]) -> dict[str, Any]:
    """`eval`'s data options (RUN_DATA and the prompt format): those given, else the adapter's run's, else the
    data set's defaults (`prompt_defaults`), as a run on it without them would have had."""
    names = (*RUN_DATA, "prompt_format")
    values: dict[str, Any] = {k: trained_with.get(k) for k in RUN_DATA}
    values |= {"prompt_format": _run_prompt_format(trained_with)} | {k: v for k, v in chosen.items() if k in names}
    values["data"] = data = values["data"] or "e2e"
    if not trained_with:
        defaults = prompt_defaults(data)
        values["prompt_format"] = values["prompt_format"] or defaults["prompt_format"]
        values["template"] = values["template"] if values["template"] is not None else defaults["template"]
    return values


def _scoring(options: dict[str, Any], trained_with: dict[str, Any]) -> ScoringSection:
    """The scoring options given, else the run's (train_config.yaml), else the defaults."""
    values: dict[str, Any] = {k: trained_with[k] for k in SCORING if k in trained_with}
    values.update(given(ScoringSection(), {k: v for k, v in options.items() if k in SCORING}))
    return ScoringSection(**values)


@app.command("eval")
@with_options(
    options_of(
        DataSection(),
        (*RUN_DATA, "prompt_format", "max_length", "max_new_tokens"),
        shown={"data": "the adapter's training data, else e2e"},
    )
    + options_of(ScoringSection(), notes={name: "default: the run's" for name in SCORING})
)
def eval_(
    model: ModelOfAdapter = None,
    adapter: AdapterFolders = None,
    split: Annotated[str, typer.Option(help="train, validation or test (test falls back to validation)")] = "test",
    limit: Annotated[int | None, typer.Option(help="score only the first N examples")] = None,
    output: Annotated[Path | None, typer.Option(help="write metrics and predictions as JSON here")] = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    **options: Any,
) -> None:
    """Score a model (with adapters) on a data split with the task's metrics (--metrics: others).

    Data and scoring options left out are taken from the first adapter's train_config.yaml when it has one.
    """
    chosen = given(DataSection(), {k: v for k, v in options.items() if k not in SCORING})
    trained_with = _trained_with(adapter)
    fields = _data_options(chosen, trained_with)
    data, prompt_format = fields.pop("data"), fields.pop("prompt_format")
    settings = replace(DataSection(), **{k: v for k, v in chosen.items() if k not in RUN_DATA})
    try:
        builtin = BUILTIN_DATASETS.get(data.removesuffix("-full"))
        if builtin is not None and split == "test" and "test" not in builtin.files:
            split = "validation"
        task = builtin.task if builtin else trained_with.get("task")
        scoring = _scoring(options, trained_with)
        target = Target(device, precision)
        base, tokenizer, task = load_with_adapters(model, adapter or [], task, target=target)
        apply_prompt_format(tokenizer, prompt_format)
        dataset = load_data(data, split, task, **fields)
        if limit is not None:
            dataset = replace(dataset, examples=dataset.examples[:limit])
        with autocast(target.device, target.dtype):
            scores, predictions = evaluate_split(
                base,
                tokenizer,
                dataset,
                settings.max_length,
                settings.max_new_tokens,
                progress=True,
                metrics=scoring.metrics,
                decoding=scoring.decoding(),
            )
    except USER_ERRORS as err:
        fail(err)
    _print_scores(f"{data} / {split} ({len(dataset)} examples)", scores)
    if output:
        report = {"metrics": scores.metrics, **scores.report(), "predictions": predictions}
        output.write_text(json.dumps(report, indent=2))


@app.command()
@with_options(
    options_of(DataSection(), ["prompt_format", "max_new_tokens"], notes={"prompt_format": "default: the run's"})
    + options_of(ScoringSection(), ["num_beams", "length_penalty", "no_repeat_ngram_size"])
)
def generate(
    prompt: Annotated[list[str] | None, typer.Argument(help="prompt text(s)")] = None,
    model: ModelOfAdapter = None,
    adapter: AdapterFolders = None,
    file: Annotated[Path | None, typer.Option(help="a file with one prompt per line")] = None,
    temperature: Annotated[float, typer.Option(help="0: no sampling (greedy, or beam search with --num-beams)")] = 0.0,
    raw: Annotated[bool, typer.Option("--raw", help="feed the prompt as is, without the chat template")] = False,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    **options: Any,
) -> None:
    """Generate text from a model with one or several adapters."""
    chosen = given(DataSection(), options)
    prompts = list(prompt or [])
    try:
        decoding = Decoding(**{k: v for k, v in chosen.items() if k in SCORING}, temperature=temperature)
        max_new_tokens = chosen.get("max_new_tokens", DataSection().max_new_tokens)
        if file is not None:
            if not file.is_file():
                raise FileNotFoundError(f"prompt file not found: {file}")
            prompts += [line for line in file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError("give a prompt or --file")
        target = Target(device, precision)
        base, tokenizer, _ = load_with_adapters(model, adapter or [], "causal-lm", target=target)
        prompt_format = chosen.get("prompt_format") or _run_prompt_format(_trained_with(adapter)) or "chat"
        apply_prompt_format(tokenizer, prompt_format)
        inputs = prompts if raw else [format_prompt(tokenizer, p) for p in prompts]
        with autocast(target.device, target.dtype):
            texts = generate_texts(base, tokenizer, inputs, max_new_tokens, decoding=decoding)
    except USER_ERRORS as err:
        fail(err)
    for text in texts:
        print(text)
