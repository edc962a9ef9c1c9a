"""`lorakit export`: an adapter (or a base model) for other runtimes: a merged GGUF model or a LoRA GGUF for
llama.cpp / Ollama (`lorakit.export`), or a merged transformers checkpoint (the `merge` command's code)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from ..methods import is_method_folder
from ..train.config import flatten, read_yaml
from ..train.run import CONFIG_FILE
from .adapters import merge
from .common import USER_ERRORS, AdapterOption, ModelOfAdapter, app, console, fail, load_with_adapters

FORMATS = ("gguf", "gguf-lora", "safetensors")
# merge's --precision for each --type a safetensors checkpoint can have.
SAFETENSORS_PRECISIONS = {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}
ADAPTER_NAME = "export"


@app.command()
def export(
    output: Annotated[Path, typer.Option(help="file to write (gguf, gguf-lora), or folder (safetensors)")],
    format: Annotated[
        str,
        typer.Option(
            help="gguf: the merged model (or the base alone) for llama.cpp / Ollama; gguf-lora: the adapter alone, "
            "for llama.cpp --lora / Ollama ADAPTER; safetensors: a merged transformers checkpoint (as lorakit merge)"
        ),
    ],
    adapter: AdapterOption = None,
    model: ModelOfAdapter = None,
    type: Annotated[
        str | None,
        typer.Option(
            help="tensor type: f32, f16, bf16, q8_0 or q4_0 (gguf; default f16), f32, f16, bf16 or q8_0 "
            "(gguf-lora; default f32), f32, f16 or bf16 (safetensors; default f32)",
            show_default=False,
        ),
    ] = None,
    dequantize: Annotated[
        bool,
        typer.Option(
            help="gguf of an adapter trained on a quantized base (QLoRA): merge it into that base decoded to float"
        ),
    ] = False,
) -> None:
    """Export for llama.cpp / Ollama: lorakit export --adapter runs/qa --format gguf --type q8_0 --output qa.gguf"""
    try:
        if format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
        if format == "safetensors":
            return _export_safetensors(adapter, model, output, type)
        if output.exists():
            raise ValueError(f"{output} exists; remove it or choose another --output")
        if adapter is None and format == "gguf-lora":
            raise ValueError("--format gguf-lora writes an adapter: give --adapter")
        _export_gguf(adapter, model, output, format, type or ("f16" if format == "gguf" else "f32"), dequantize)
    except USER_ERRORS as err:
        fail(err)
    console.print(f"{format} ({output.stat().st_size / 1e6:.1f} MB) written to [bold]{output}[/]")


def _export_safetensors(adapter: Path | None, model: str | None, output: Path, type: str | None) -> None:
    if adapter is None:
        raise ValueError("--format safetensors merges an adapter into its base: give --adapter")
    if (type or "f32") not in SAFETENSORS_PRECISIONS:
        raise ValueError(f"--format safetensors takes --type {', '.join(SAFETENSORS_PRECISIONS)}, not {type!r}")
    merge(adapter=adapter, output=output, model=model, precision=SAFETENSORS_PRECISIONS[type or "f32"])


def _export_gguf(
    adapter: Path | None, model: str | None, output: Path, format: str, type: str, dequantize: bool
) -> None:
    import lorakit
    from lorakit.export import GGUF_TYPES, export_gguf, export_gguf_lora

    if type not in GGUF_TYPES:  # before any model is loaded
        raise ValueError(f"unknown GGUF type {type!r}; expected one of: {', '.join(GGUF_TYPES)}")
    if adapter is not None and is_method_folder(adapter):
        raise ValueError(f"{adapter} holds another fine-tuning method, not a LoRA adapter: GGUF export takes LoRA")
    adapters, names = ([adapter], [ADAPTER_NAME]) if adapter else ([], None)
    if format == "gguf-lora":
        base, _, _ = load_with_adapters(model, adapters, "causal-lm", names=names)
        export_gguf_lora(base, output, name=ADAPTER_NAME, type=type)
        return
    quantized = _trained_on_quantized_base(adapter)
    if quantized and not dequantize:
        raise ValueError(
            f"the adapter was trained on a {quantized}-quantized base (QLoRA); add --dequantize to merge it into "
            f"that base decoded to float (what it was trained with), or export it alone with --format gguf-lora"
        )
    if quantized and adapter is not None:
        merged, tokenizer = _merged_on_decoded_base(adapter, model, quantized)
    else:
        base, tokenizer, _ = load_with_adapters(model, adapters, "causal-lm", names=names)
        merged = lorakit.merge_and_unload(base) if adapter else base
    export_gguf(merged, tokenizer, output, type=type)


def _trained_on_quantized_base(adapter: Path | None) -> str | None:
    """The `--quantize` method the adapter's run used (its train_config.yaml), or None."""
    run_file = adapter / CONFIG_FILE if adapter else None
    if run_file is None or not run_file.is_file():
        return None
    return flatten(read_yaml(run_file)).get("quantize") or None


def _merged_on_decoded_base(adapter: Path, model: str | None, method: str) -> tuple[Any, Any]:
    """(merged model, tokenizer): the base quantized as `lorakit train --quantize` quantized it, the adapter on it,
    merged into the decoded float weights (lorakit.merge_and_unload with a dtype)."""
    import lorakit

    from ..models import load_model

    config, _ = lorakit.read_adapter(adapter)
    name = model or config.base_model_name_or_path
    if not name:
        raise ValueError("--model is required (the adapter does not name its base model)")
    base, tokenizer = load_model(name, "causal-lm")
    lorakit.quantize(base, method)
    lorakit.load_adapter(base, adapter, name=ADAPTER_NAME)
    return lorakit.merge_and_unload(base, dtype=torch.float32), tokenizer
