"""QLoRA-style quantized base models: freeze the base in 4-bit NF4 (double-quantized) or 8-bit, train LoRA
on top.

    import lorakit
    report = lorakit.quantize(model, "nf4")          # nn.Linear → QuantLinear, in place; lm_head is kept
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ...train as usual...

`quantize` replaces frozen `nn.Linear` layers; `add_adapter` then wraps the quantized layers in
`LoraQuantLinear`. `dequantize` turns them back into plain `nn.Linear`; `save_quantized` /
`load_quantized` store the quantized base as safetensors. Pure PyTorch: CPU and GPU alike.

This package owns the model-level operations (`quantize`, `dequantize`, the report); the layer and its
storage formats are `linear`, `nf4` and `int8`, the file format `files`. It depends on no adapter code:
`lorakit.layers` builds on `QuantLinear`, so anything here importing the adapter side would import itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from ..targets import HEAD_NAMES, name_matches, output_head, own_weight, weight_owners
from .files import load_quantized, save_quantized
from .linear import METHODS, QuantLinear, is_quantized, make_codec, quantized_layers

logger = logging.getLogger(__name__)

# Where an adapter keeps the module it wraps: a LoRA layer's `base_layer`, a `modules_to_save` wrapper's
# `original_module` (PEFT's names, as in the state-dict keys `files` leaves out).
_WRAPPED_NAMES = ("base_layer", "original_module")


@dataclass
class QuantizeReport:
    """What `quantize` did: the layers it quantized, those it left (path → reason), and the bytes of the
    quantized layers' weights before (float) and after (codes and scales)."""

    method: str
    double_quant: bool
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    float_bytes: int = 0
    quantized_bytes: int = 0

    def summary(self) -> str:
        kind = self.method + ("+dq" if self.method == "nf4" and self.double_quant else "")
        ratio = self.quantized_bytes / self.float_bytes if self.float_bytes else 0.0
        text = (
            f"quantized {len(self.quantized)} linear layers to {kind}: weights {self.float_bytes / 2**20:.1f} MiB "
            f"→ {self.quantized_bytes / 2**20:.1f} MiB ({ratio:.3f}×)"
        )
        if self.skipped:
            reasons: dict[str, list[str]] = {}
            for path, reason in self.skipped.items():
                reasons.setdefault(reason, []).append(path)
            text += "; kept: " + "; ".join(
                f"{', '.join(paths[:3])}{' …' if len(paths) > 3 else ''} ({reason})"
                for reason, paths in reasons.items()
            )
        return text

    def __str__(self) -> str:
        return self.summary()


def _output_head_path(model: nn.Module) -> str | None:
    head = output_head(model)
    if head is None:
        return None
    return next((p for p, m in model.named_modules() if m is head), None)


def _adapted_modules(model: nn.Module) -> list[str]:
    """Paths of the modules an adapter already wraps (quantizing must come before adding adapters)."""
    return [path.rsplit(".", 1)[0] for path, _ in model.named_modules() if name_matches(list(_WRAPPED_NAMES), path)]


def _plan(model: nn.Module, skip: list[str]) -> tuple[list[str], dict[str, str]]:
    """Paths to quantize, and every other weight-bearing (≥ 2-D weight) module with the reason it is kept."""
    owners = weight_owners(model)
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for path, module in model.named_modules():
        weight = own_weight(module) if path else None
        if weight is None or weight.dim() < 2:
            continue
        if type(module) is not nn.Linear:
            # Subclasses of nn.Linear may compute differently (or read .weight in place): not touched.
            skipped[path] = f"{type(module).__name__} is not a supported layer type (only nn.Linear is quantized)"
        elif name_matches(skip, path):
            skipped[path] = "in skip list"
        elif len(owners.get(id(weight), [])) > 1:
            others = [p for p in owners[id(weight)] if p != path]
            skipped[path] = f"weight tied to {', '.join(others)}"
        elif not weight.is_floating_point():
            skipped[path] = f"weight is {weight.dtype}, not floating point"
        else:
            chosen.append(path)
    return chosen, skipped


def quantize(
    model: nn.Module,
    method: str = "nf4",
    *,
    double_quant: bool = True,
    skip: list[str] | None = None,
    block_size: int = 64,
) -> QuantizeReport:
    """Replace the model's frozen `nn.Linear` layers by `QuantLinear` in place and return a report.

    method: "nf4" (4-bit NormalFloat, blocks of `block_size`, `double_quant` = int8 block constants),
    "int8" (symmetric absmax per output row) or "int8-asym" (zero point per output row).
    skip: module names (matched against the end of the path, like `target_modules`) to keep in float.
    Default: the output head (`lm_head`) and classification heads (`classifier`, `score`). A weight tied to
    another module (a tied embedding) is never quantized; other layer types are left with a listed reason.
    Quantizing twice, or after adapters were added, is refused.
    """
    method = method.lower() if isinstance(method, str) else method
    make_codec(method, block_size, double_quant)  # validates method and block size
    if is_quantized(model):
        raise ValueError(
            "the model is already quantized; quantizing twice would compound the rounding error "
            "(call lorakit.quant.dequantize(model) first to change the format)"
        )
    adapted = _adapted_modules(model)
    if adapted:
        raise ValueError(
            f"quantize the base model before adding adapters (the model already has adapters on {adapted[:5]})"
        )
    if skip is None:
        head = _output_head_path(model)
        skip = [*([head] if head else []), *HEAD_NAMES]
    chosen, skipped = _plan(model, list(skip))
    if not chosen:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer to quantize" + (f"; kept: {skipped}" if skipped else "")
        )
    report = QuantizeReport(method=method, double_quant=double_quant, skipped=skipped)
    for path in chosen:
        # Replace one layer at a time and keep no reference to the float layer, so each float weight is
        # freed as soon as its quantized copy exists: the peak stays one layer above the model's size.
        linear = cast(nn.Linear, model.get_submodule(path))  # the plan chose exact nn.Linear layers
        layer = QuantLinear.from_linear(linear, method, block_size=block_size, double_quant=double_quant)
        report.float_bytes += linear.weight.numel() * linear.weight.element_size()
        report.quantized_bytes += layer.quantized_bytes()
        model.set_submodule(path, layer)
        del linear
        report.quantized.append(path)
    logger.info(report.summary())
    return report


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every QuantLinear (also inside LoRA wrappers) by a plain nn.Linear with the decoded weight,
    in `dtype` (default: each layer's original dtype). Returns the model."""
    for path, layer in list(quantized_layers(model)):
        model.set_submodule(path, layer.to_linear(dtype))
    return model


def requantization_errors(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per LoRA layer on a quantized base: the error the last merge/unmerge re-quantization added
    (`max_abs`, `rel_frobenius` of re-quantized minus exact merged weight)."""
    return {
        path: dict(module.requantization_error)
        for path, module in model.named_modules()
        if getattr(module, "requantization_error", None)
    }


__all__ = [
    "METHODS",
    "QuantLinear",
    "QuantizeReport",
    "dequantize",
    "is_quantized",
    "load_quantized",
    "quantize",
    "quantized_layers",
    "requantization_errors",
    "save_quantized",
]
