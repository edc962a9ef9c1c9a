"""From a model reference to its config, and from a config to a model on the `meta` device.

Only configs are read: a built-in short name, a local folder with `config.json`, a `config.json`-style
file, a `.gguf` file (its metadata), or a hub id (`AutoConfig.from_pretrained`, which downloads one
small JSON file when a network is there). The model is then built on `meta`: every module and
parameter shape exists, no memory is allocated and no weight is read, so a 70B config builds in seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from ..models import BUILTIN_MODELS, TASKS, model_cache_dir

# The compute precision, in torch's spelling or `lorakit train --precision`'s.
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass
class Source:
    """A model reference resolved: its config, how estimates name it, and what a built-in model says."""

    config: PretrainedConfig
    label: str
    task: str | None  # a built-in model's task
    default_targets: list[str] | None  # a built-in model's LoRA target modules


def resolve_source(model: str | PretrainedConfig | dict[str, Any]) -> Source:
    config, task = load_config(model)
    label = model if isinstance(model, str) else getattr(config, "name_or_path", "") or config.model_type
    entry = BUILTIN_MODELS.get(model) if isinstance(model, str) else None
    return Source(config, label, task, list(entry.target_modules) if entry else None)


def load_config(model: str | PretrainedConfig | dict[str, Any]) -> tuple[PretrainedConfig, str | None]:
    """The model's config and, for a built-in, its task. Raises ValueError naming what was tried."""
    if isinstance(model, PretrainedConfig):
        return model, None
    if isinstance(model, dict):
        return _config_from_dict(dict(model), "the given dict"), None
    entry = BUILTIN_MODELS.get(model)
    if entry is not None:
        return _builtin_config(entry), entry.task
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder without a config.json")
        return AutoConfig.from_pretrained(str(path)), None
    if path.is_file():
        if path.suffix == ".gguf":
            return _gguf_config(path), None
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a JSON model config: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a JSON model config (expected an object)")
        return _config_from_dict(data, str(path)), None
    try:
        return AutoConfig.from_pretrained(model), None
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"'{model}' is not a built-in model ({', '.join(BUILTIN_MODELS)}), not an existing folder or config "
            f"file, and its config could not be read from the Hugging Face Hub: {err}"
        ) from None


def _config_from_dict(data: dict[str, Any], where: str) -> PretrainedConfig:
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError(f"{where} has no 'model_type' field, so the architecture is unknown")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as err:
        raise ValueError(f"{where}: unknown model_type {model_type!r} for this transformers version ({err})") from None


def _builtin_config(entry) -> PretrainedConfig:
    source = entry.locate()
    if not entry.is_gguf:
        return AutoConfig.from_pretrained(str(source))
    cached = model_cache_dir(entry.name) / "config.json"
    if cached.is_file():  # the plain copy `lorakit train` made: same config, no GGUF parsing
        return AutoConfig.from_pretrained(str(cached.parent))
    return _gguf_config(source)


def _gguf_config(path: Path) -> PretrainedConfig:
    """The config in a GGUF file's metadata (transformers reads the header; tensors stay on disk)."""
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise ValueError(f"cannot read a model config from {path}: {err}") from None


def default_task(config: PretrainedConfig) -> str:
    """causal-lm for decoders, seq-cls for encoders: from the config's `architectures` when it names a task
    head, else by whether transformers knows the architecture as a masked-LM encoder."""
    for arch in config.architectures or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith(("ForSequenceClassification", "ForMaskedLM", "ForPreTraining")):
            return "seq-cls"
    return "seq-cls" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "causal-lm"


def build_on_meta(config: PretrainedConfig, task: str, dtype: torch.dtype, num_labels: int = 2) -> PreTrainedModel:
    """The model of `config` with its task head, on the meta device (no memory, no weights)."""
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; expected one of: {', '.join(TASKS)}")
    config = config.__class__.from_dict(config.to_dict())  # a copy: the caller's config stays untouched
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    if task == "seq-cls":
        config.num_labels = num_labels
    try:
        with torch.device("meta"):
            model = auto.from_config(config, dtype=dtype)
    except Exception as err:  # transformers raises many kinds for an unsupported architecture
        raise ValueError(
            f"cannot build a {task} model for architecture {config.model_type!r} on the meta device: "
            f"{type(err).__name__}: {err}"
        ) from None
    if any(p.device.type != "meta" for p in model.parameters()):
        raise ValueError(f"architecture {config.model_type!r} created real tensors instead of meta ones")
    return model
