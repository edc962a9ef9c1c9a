"""The sections of a training job's options (`RunConfig`): each a dataclass whose fields are options.

Every field's metadata carries its help ("help") and, where they differ from the name, its command-line
spellings ("flags"); its default lives in the field, once. `option` makes such a field, `borrowed` takes one
from the dataclass that owns the setting (`LoraConfig`, `MethodOptions`) so it is stated once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import TRAIN_LORA_DEFAULTS, LoraConfig
from ..device import DEVICE_HELP, PRECISION_HELP
from ..generate import Decoding
from ..methods import METHOD_OPTION_NAMES, METHODS, MethodOptions
from ..metrics import DEFAULTS_TEXT, METRICS_HELP, check_known
from .data import CLASSIFICATION, GENERATION, REGRESSION

MODEL_HELP = "base model: a built-in name (smollm2-135m, minilm-l6, ...), a local folder or .gguf file, or a hub id"


def option(default: Any, help: str, **more: Any) -> Any:
    """A field holding an option: its default, its help, and optionally "flags" or "default_text" (what the help
    shows for a default that is computed later)."""
    return field(default=default, metadata={"help": help, **more})


def borrowed(owner: type, name: str, **changes: Any) -> Any:
    """`owner`'s field `name` as an option: its default and metadata, so they are stated once. `changes` replace
    the default (say why in the help) or metadata entries."""
    source = next(f for f in dataclasses.fields(owner) if f.name == name)
    default = changes.pop("default", source.default)
    return field(default=default, metadata={**source.metadata, **changes})


@dataclass
class DataSection:
    """Which data, how it is cut, and how much of it is used."""

    data: str = option("e2e", "built-in (e2e, sst2, mrpc, or <name>-full), a .jsonl/.json/.csv/.tsv file, or hf:<id>")
    eval_data: str | None = option(
        None,
        "data scored before/after training and used for the validation loss (a file, or hf:<id>: its validation "
        "split), instead of a tenth held out of --data",
        flags=("--eval-data", "--validation-data"),
    )
    columns: list[str] | None = option(None, "names of the columns of a header-less .csv/.tsv file, in order")
    input_field: str | None = option(None, "field holding the input text")
    target_field: str | None = option(None, "field holding the target text or label")
    pair_field: str | None = option(None, "second text field for sentence-pair classification")
    template: str | None = option(None, "prompt template with {field} placeholders (e2e: {mr})")
    prompt_format: str | None = option(
        None,
        "chat: prompts in the tokenizer's chat template (when it has one); plain: BOS, the prompt and a newline "
        "(shorter rows; the adapter then expects this form)",
        default_text="the data set's: plain for e2e, else chat",
    )
    max_length: int | None = option(
        None, "maximum tokens per example", default_text="auto: the longest row, at most the model's context and 1024"
    )
    long_rows: str = option("truncate", "rows over --max-length: truncate (keep the prompt's end) or drop")
    references: str = option(
        "all", "training rows per input: all its references, or central (the one closest to the others in BLEU)"
    )
    max_train_examples: int | None = option(None, "use only the first N training examples")
    eval_examples: int | None = option(
        50, "examples scored before and after training, spread evenly over the split (none: the whole split)"
    )
    score_base: bool = option(
        True, "score the base model too, before training (off: the trained model only, half the scoring time)"
    )
    val_examples: int = option(64, "held-out examples for the validation loss")
    max_new_tokens: int = option(64, "generation length when scoring")


@dataclass
class ModelSection:
    """The base model and the task it is trained for."""

    model: str | None = option(None, MODEL_HELP, default_text="smollm2-135m for causal-lm, else minilm-l6")
    task: str | None = option(
        None, f"{GENERATION}, {CLASSIFICATION} or {REGRESSION}", default_text="from the data or model"
    )


@dataclass
class LoraSection:
    """What builds the `LoraConfig` of `--method lora` (the rest of it follows from the model)."""

    target_modules: list[str] | str | None = borrowed(
        LoraConfig, "target_modules", default_text="the built-in model's, else all-linear"
    )
    quantize: str | None = option(
        None, "QLoRA: quantize the frozen base's linear layers: nf4 (4-bit, double-quantized), int8 or int8-asym"
    )
    r: int = borrowed(LoraConfig, "r", default=TRAIN_LORA_DEFAULTS["r"])  # LoraConfig's: 8
    alpha: float = borrowed(LoraConfig, "alpha", default=TRAIN_LORA_DEFAULTS["alpha"])  # LoraConfig's: 16
    dropout: float = borrowed(
        LoraConfig,
        "dropout",
        default=TRAIN_LORA_DEFAULTS["dropout"],
        help="dropout on the LoRA input (a LoraConfig built in code defaults to 0, as PEFT's)",
    )
    init: str = borrowed(LoraConfig, "init")
    use_rslora: bool = borrowed(LoraConfig, "use_rslora")
    use_dora: bool = borrowed(LoraConfig, "use_dora")

    def lora_config(self, model_meta: dict[str, Any]) -> LoraConfig:
        """The adapter's config; the LoRA method adds the model's classification heads as modules_to_save."""
        return LoraConfig(
            r=self.r,
            alpha=self.alpha,
            dropout=self.dropout,
            init=self.init,
            target_modules=self.target_modules or "all-linear",
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            **model_meta,
        )


@dataclass
class MethodSection:
    """The fine-tuning method and the options of each (a method reads its own)."""

    method: str = option("lora", f"fine-tuning method: {', '.join(METHODS)} (head: linear probing)")
    adapter_size: int = borrowed(MethodOptions, "adapter_size")
    adapter_nonlinearity: str = borrowed(MethodOptions, "adapter_nonlinearity")
    adapter_norms: bool = borrowed(MethodOptions, "adapter_norms")
    prefix_length: int = borrowed(MethodOptions, "prefix_length")
    prompt_length: int = borrowed(MethodOptions, "prompt_length")
    lora: LoraSection = field(default_factory=LoraSection)

    def method_options(self, lora: LoraConfig) -> MethodOptions:
        """What `FineTuningMethod.apply` reads (each method its own fields)."""
        return MethodOptions(**{name: getattr(self, name) for name in METHOD_OPTION_NAMES}, lora=lora)


@dataclass
class ScoringSection:
    """What the scored examples are scored with (`lorakit.metrics`), and how the text they score is generated."""

    metrics: list[str] | None = option(None, METRICS_HELP, default_text=f"by task: {DEFAULTS_TEXT}")
    num_beams: int = option(1, "beam search width for generated text (1: greedy; the LoRA paper decodes E2E with 10)")
    length_penalty: float = option(
        1.0, "beam search: each beam's score is divided by its length ** this (below 1 favours shorter; the paper: 0.9)"
    )
    no_repeat_ngram_size: int = option(0, "never repeat an n-gram of this size in a generated text (0: off; paper: 4)")

    def __post_init__(self) -> None:
        if isinstance(self.metrics, str):  # a YAML file may write the list as "a,b"
            self.metrics = [name.strip() for name in self.metrics.split(",") if name.strip()]
        check_known(self.metrics or [])
        self.decoding()  # refuses a bad width or n-gram size now, not after training

    def decoding(self) -> Decoding:
        return Decoding(self.num_beams, self.length_penalty, self.no_repeat_ngram_size)


@dataclass
class RunSection:
    """Where the run goes and how it runs: output folder, resumption, processes."""

    output: str | None = option(None, "output folder", default_text="runs/<data>-<model>")
    resume: bool = option(False, "continue from the last checkpoint in --output")
    overwrite: bool = option(False, "replace a run already in --output")
    distributed: str | None = option(None, "ddp or fsdp, under torchrun (several processes alone mean ddp)")
    dist_timeout: float = option(600.0, "seconds a process waits for the others before failing")


@dataclass
class HardwareSection:
    """Where the run computes and in which precision (`lorakit.device`)."""

    device: str = option("auto", DEVICE_HELP)
    precision: str = option("auto", PRECISION_HELP)
