"""Plan before you train: memory, storage and FLOPs of fine-tuning a model, from its config alone.

    from lorakit.estimation import estimate, compare
    est = estimate("smollm2-135m", method="lora", batch_size=4, max_length=128)
    print(est.total_bytes / 1e9, "GB")
    for e in compare("meta-llama/Llama-2-7b-hf", batch_size=1, max_length=2048, dtype="bfloat16"): ...

How the figures are obtained (assumptions in full):

* The model is built from its config on the `meta` device (no weights read, no memory used), and the
  method is applied to it for real (`methods.py`): parameter counts are those of the instantiated model.
* Frozen weights: every parameter that does not train, plus buffers, in `dtype` (quantized linear layers
  at their stored size: NF4 ≈ 4.127 bits, int8 8 bits + a 32-bit scale per row). Trainable weights,
  their gradients and the optimizer state are in `dtype` too (PyTorch keeps AdamW's two moments and
  SGD's momentum in the parameter's dtype): weights + gradients + optimizer = 4 copies with AdamW,
  3 with SGD with momentum, as in the seeds' accounting.
* Activations and the peak: one steady-state training step (forward, backward, clipping, optimizer step,
  with the optimizer state already created) is played on meta with the real transformers code
  (`simulate.py`), following every tensor's lifetime: the peak of live bytes (saved activations,
  temporaries such as the B × T × vocab logits and their gradient, gradients as they appear, optimizer
  state) over the step. Batches are full length (no padding). This tensor peak matches a real CPU step
  byte for byte (tests/test_estimate.py) and the measured peak RSS within a few percent when malloc
  returns freed memory at once. With glibc's default malloc the process keeps freed blocks for reuse,
  so on CPU the total adds `CPU_RUNTIME_BYTES` and `CPU_MALLOC_SLACK` (a fixed part + a share of the
  activation peak, by kind of method), calibrated against measured peaks (bench/estimate_vs_measured.py).
  On CUDA add the CUDA context (~0.3–1 GB) and the caching allocator's fragmentation: not modelled.
* FLOPs: every matmul and attention kernel of the forward and backward pass of the simulated step,
  counted with PyTorch's FLOP formulas (`torch.utils.flop_counter`; attention is counted over the full
  T × T, as those formulas do, though causal kernels skip about half of it). For comparison,
  `flops_rule` is the rule of thumb: 6 · N · tokens for full fine-tuning (2 forward + 4 backward),
  4 · N · tokens for a frozen base (forward + input gradients; frozen weights get no gradient)
  + 6 · N_trainable · tokens, plus attention's 12 · layers · B · T² · d, N being the parameters of the
  linear layers.
* Adapter file: the safetensors file the method writes (the LoRA adapter, the trainable tensors, or
  for full fine-tuning the whole model), header included.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from .methods import METHODS, Prepared, Settings, prepare, text_config
from .resolve import DTYPES, build_on_meta, default_task, load_config
from .simulate import simulate_training

OPTIMIZERS = {"adamw": 2, "sgd": 1}  # state tensors per trainable parameter
DEVICES = ("cpu", "cuda")
# CPU only. glibc's malloc keeps freed blocks for reuse, so the resident memory at the peak exceeds the live
# tensors by (bytes, share of the activation peak), fitted on 14 measured peaks (bench/estimate_vs_measured.py:
# SmolLM2-135M and MiniLM-L6 × full / LoRA / QLoRA × batch 4×128, 8×64, 8×256; all within 9 % after the fit).
# Full fine-tuning keeps least: its gradients are allocated into the blocks the activations free during the
# backward pass. A quantized base keeps most: it decodes its weights into temporaries in every forward and
# backward pass. Adapter, prefix, prompt and BitFit use the frozen-base figures (not measured separately).
CPU_MALLOC_SLACK = {"full": (110_000_000, 0.30), "frozen": (0, 0.85), "quantized": (50_000_000, 1.0)}
# Plus what the first training step sets up besides tensors (autograd graph, oneDNN / OpenMP buffers;
# measured 36 to 69 MB with an allocator that returns freed memory at once).
CPU_RUNTIME_BYTES = 40_000_000

__all__ = [
    "CPU_MALLOC_SLACK", "CPU_RUNTIME_BYTES", "DEVICES", "Estimate", "METHODS", "OPTIMIZERS", "compare", "estimate",
]


@dataclass
class Estimate:
    """The plan for one method. Byte counts are exact for weights, gradients and optimizer state; the
    activation and peak figures come from the simulated training step."""

    model: str
    architecture: str
    task: str
    method: str
    dtype: str
    quantize: str | None
    optimizer: str
    batch_size: int
    max_length: int
    grad_checkpointing: bool
    device: str
    target_modules: list[str] | str | None
    total_parameters: int  # the base model's (tied parameters once)
    trainable_parameters: int
    frozen_weight_bytes: int
    trainable_weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int | None  # the most activation memory alive at once during the step
    tensor_peak_bytes: int  # weights + the simulated step's peak of live tensors
    allocator_bytes: int  # CPU: allocator slack and runtime buffers beyond the tensors (0 on cuda)
    total_bytes: int  # expected peak memory of training: tensor peak + allocator slack
    adapter_file_bytes: int
    flops_per_step: int | None
    forward_flops: int | None
    flops_rule: int
    attention: str
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_parameters / self.total_parameters if self.total_parameters else 0.0

    @property
    def static_bytes(self) -> int:
        """Weights + gradients + optimizer state: the seeds' accounting, without activations."""
        return self.frozen_weight_bytes + self.trainable_weight_bytes + self.gradient_bytes + self.optimizer_bytes

    def seconds_per_step(self, tflops: float) -> float | None:
        """Time of one step at a sustained `tflops` (10¹² FLOP/s)."""
        return None if self.flops_per_step is None else self.flops_per_step / (tflops * 1e12)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["trainable_fraction"] = self.trainable_fraction
        data["static_bytes"] = self.static_bytes
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def estimate(
    model: str | PretrainedConfig | dict[str, Any],
    method: str = "lora",
    *,
    task: str | None = None,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    target_modules: list[str] | str | None = None,
    quantize: str | None = None,
    dtype: str = "float32",
    optimizer: str = "adamw",
    batch_size: int = 8,
    max_length: int = 256,
    grad_checkpointing: bool = False,
    device: str = "cpu",
    adapter_size: int = 64,
    prefix_length: int = 30,
    prompt_length: int = 20,
    num_labels: int = 2,
    simulate: bool = True,
) -> Estimate:
    """Estimate memory, adapter size and FLOPs of training `model` with `method`, without loading weights.

    model: a built-in name, a folder with config.json, a JSON config file, a .gguf file, a hub id, a
    `PretrainedConfig` or a config dict (with `model_type`). The defaults mirror `lorakit train`
    (r=8, alpha=16, dropout=0.05, AdamW, the built-in model's target modules, else all-linear).
    `simulate=False` skips the simulated step: parameter, weight, optimizer and file figures only.
    Raises ValueError for an unknown model, option or an architecture that cannot be built on meta.
    """
    _check_options(method, dtype, optimizer, device, batch_size, max_length, quantize)  # before any hub lookup
    config, builtin_task, label, default_targets = _resolve(model)
    return _estimate_one(config, label, builtin_task, default_targets, method, task=task, r=r, alpha=alpha,
                         dropout=dropout, target_modules=target_modules, quantize=quantize, dtype=dtype,
                         optimizer=optimizer, batch_size=batch_size, max_length=max_length,
                         grad_checkpointing=grad_checkpointing, device=device, adapter_size=adapter_size,
                         prefix_length=prefix_length, prompt_length=prompt_length, num_labels=num_labels,
                         simulate=simulate)


def compare(model: str | PretrainedConfig | dict[str, Any], methods: list[str] | None = None,
            **options: Any) -> list[Estimate | str]:
    """`estimate` for each method (default: all); a method that does not apply (BitFit on a model without
    biases, quantization with full fine-tuning) gives the reason as a string in its place."""
    for method in methods or list(METHODS):  # bad options fail every method alike: raise them, before any hub lookup
        _check_options(method, options.get("dtype", "float32"), options.get("optimizer", "adamw"),
                       options.get("device", "cpu"), options.get("batch_size", 8), options.get("max_length", 256),
                       options.get("quantize"))
    config, builtin_task, label, default_targets = _resolve(model)
    results: list[Estimate | str] = []
    for method in methods or list(METHODS):
        opts = dict(options)
        if method == "full":
            opts.pop("quantize", None)
        try:
            results.append(_estimate_one(config, label, builtin_task, default_targets, method, **opts))
        except ValueError as err:  # the method does not apply to this model
            results.append(f"{method}: {err}")
    return results


# -- internals --------------------------------------------------------------------------------------
class _NotSimulated(Exception):
    pass


def _resolve(model) -> tuple[PretrainedConfig, str | None, str, list[str] | None]:
    from ..models import BUILTIN_MODELS

    config, builtin_task = load_config(model)
    if isinstance(model, str):
        label = model
    else:
        label = getattr(config, "name_or_path", "") or config.model_type
    entry = BUILTIN_MODELS.get(model) if isinstance(model, str) else None
    return config, builtin_task, label, list(entry.target_modules) if entry else None


def _check_options(method: str, dtype: str, optimizer: str, device: str, batch_size: int, max_length: int,
                   quantize: str | None) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of: {', '.join(METHODS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of: {', '.join(DTYPES)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of: {', '.join(OPTIMIZERS)}")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of: {', '.join(DEVICES)}")
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch size and max length must be positive, got {batch_size} and {max_length}")
    if quantize is not None:
        from ..quant import METHODS as QUANT_METHODS

        if quantize not in QUANT_METHODS:
            raise ValueError(f"unknown quantization {quantize!r}; expected one of: {', '.join(QUANT_METHODS)}")


def _estimate_one(config: PretrainedConfig, label: str, builtin_task: str | None, default_targets, method: str, *,
                  task=None, r=8, alpha=16.0, dropout=0.05, target_modules=None, quantize=None, dtype="float32",
                  optimizer="adamw", batch_size=8, max_length=256, grad_checkpointing=False, device="cpu",
                  adapter_size=64, prefix_length=30, prompt_length=20, num_labels=2, simulate=True) -> Estimate:
    _check_options(method, dtype, optimizer, device, batch_size, max_length, quantize)
    task = task or builtin_task or default_task(config)
    model = build_on_meta(config, task, DTYPES[dtype], num_labels)
    base_params = _unique_params(model)
    total_parameters = sum(p.numel() for p in base_params)
    settings = Settings(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, quantize=quantize,
                        adapter_size=adapter_size, prefix_length=prefix_length, prompt_length=prompt_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(model, method, task, settings, batch_size, max_length, default_targets)
        if grad_checkpointing:
            _enable_checkpointing(model)
    model.train()

    params = _unique_params(model)
    trainable = [p for p in params if p.requires_grad]
    trainable_parameters = sum(p.numel() for p in trainable)
    trainable_bytes = sum(_nbytes(p) for p in trainable)
    frozen_bytes = sum(_nbytes(p) for p in params if not p.requires_grad) + sum(_nbytes(b) for b in model.buffers())
    gradient_bytes = trainable_bytes
    optimizer_bytes = OPTIMIZERS[optimizer] * trainable_bytes
    notes = list(prepared.notes)

    tokens = batch_size * (max_length + (prompt_length if method == "prompt" else 0))
    flops_rule = _flops_rule(model, method, trainable, tokens, batch_size, max_length)
    try:
        if not simulate:
            raise _NotSimulated
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            profile = simulate_training(model, prepared.make_batch, optimizer, device)
    except Exception as err:  # an architecture whose forward pass needs real values
        if isinstance(err, _NotSimulated):
            notes.append("training step not simulated: no activations or FLOPs; the total counts weights, "
                         "gradients and optimizer state only")
        else:
            notes.append(f"activations unknown: the forward pass cannot run on the meta device ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); the total counts weights, gradients "
                         "and optimizer state only")
        activation_bytes, flops, forward_flops, attention = None, None, None, "unknown"
        tensor_peak = frozen_bytes + trainable_bytes + gradient_bytes + optimizer_bytes
        allocator = 0
    else:
        activation_bytes = profile.activation_peak_bytes
        flops, forward_flops, attention = profile.flops, profile.forward_flops, profile.attention_path
        tensor_peak = frozen_bytes + trainable_bytes + profile.peak_bytes
        kind = "full" if method == "full" else "quantized" if (quantize or method == "qlora") else "frozen"
        fixed, share = CPU_MALLOC_SLACK[kind]
        allocator = round(CPU_RUNTIME_BYTES + fixed + share * activation_bytes) if device == "cpu" else 0
    if device == "cuda":
        notes.append("not included on CUDA: the CUDA context (about 0.3–1 GB) and the caching allocator's "
                     "fragmentation")
    if attention == "math":
        notes.append("attention runs PyTorch's math path (attention dropout during training on CPU): the "
                     "B × heads × T × T probabilities are kept for the backward pass")
    return Estimate(
        model=label, architecture=type(model).__name__, task=task, method=method, dtype=dtype,
        quantize=settings.quantize or ("nf4" if method == "qlora" else None), optimizer=optimizer,
        batch_size=batch_size, max_length=max_length, grad_checkpointing=grad_checkpointing, device=device,
        target_modules=prepared.target_modules, total_parameters=total_parameters,
        trainable_parameters=trainable_parameters, frozen_weight_bytes=frozen_bytes,
        trainable_weight_bytes=trainable_bytes, gradient_bytes=gradient_bytes, optimizer_bytes=optimizer_bytes,
        activation_bytes=activation_bytes, tensor_peak_bytes=tensor_peak, allocator_bytes=allocator,
        total_bytes=tensor_peak + allocator, adapter_file_bytes=safetensors_size(prepared.saved_tensors),
        flops_per_step=flops, forward_flops=forward_flops, flops_rule=flops_rule, attention=attention, notes=notes,
    )


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _enable_checkpointing(model: nn.Module) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers ≥ 5.x's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for config in (model.config, text_config(model)):
        config.use_cache = False  # what transformers switches to itself, with a warning, under checkpointing


def _flops_rule(model: nn.Module, method: str, trainable: list[nn.Parameter], tokens: int, batch_size: int,
                max_length: int) -> int:
    """6·N·tokens (full) or 4·N·tokens + 6·N_trainable·tokens (frozen base), plus attention's T² terms."""
    from ..quant import QuantLinear

    trainable_ids = {id(p) for p in trainable}
    frozen_matmul = trained_matmul = 0
    for module in model.modules():  # a LoRA layer's base layer, A and B are linear modules inside it
        if isinstance(module, QuantLinear):
            frozen_matmul += module.in_features * module.out_features
            continue
        weight = module._parameters.get("weight") if isinstance(module, (nn.Linear, _conv1d())) else None
        if weight is not None:
            if id(weight) in trainable_ids:
                trained_matmul += weight.numel()
            else:
                frozen_matmul += weight.numel()
    config = text_config(model)
    seq = tokens // batch_size
    attention = 12 * config.num_hidden_layers * batch_size * seq * seq * config.hidden_size
    return 6 * trained_matmul * tokens + 4 * frozen_matmul * tokens + attention


def _conv1d():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
                       torch.uint8: "U8", torch.int64: "I64", torch.int32: "I32", torch.float64: "F64"}


def safetensors_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Bytes of the safetensors file holding `tensors` (meta tensors are fine: only shapes are read):
    8-byte header length, the JSON header padded to a multiple of 8, then the data."""
    metadata = {"format": "pt"} if metadata is None else metadata
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in sorted(tensors):
        t = tensors[key]
        size = _nbytes(t)
        header[key] = {"dtype": _SAFETENSORS_DTYPES.get(t.dtype, "F32"), "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    return 8 + math.ceil(len(text.encode()) / 8) * 8 + offset
