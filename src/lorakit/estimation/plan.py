"""One estimate: build the model on meta, apply the method, read the static figures off the model, play the
training step, and assemble the `Estimate`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..config import TRAIN_LORA_DEFAULTS
from ..device import trainable_to_float32
from ..methods import METHOD_OPTION_NAMES, MethodOptions
from ..train.checkpointing import enable_checkpointing
from .costs import (
    DEVICES,
    OPTIMIZERS,
    Weights,
    allocator_bytes,
    flops_rule,
    safetensors_size,
    unique_parameters,
    weights,
)
from .methods import Prepared, lora_settings, prepare, resolve_method
from .resolve import DTYPES, Source, build_on_meta, default_task
from .result import Estimate
from .simulate import simulate_training


def _default(owner: type, name: str) -> Any:
    return next(f.default for f in fields(owner) if f.name == name)


@dataclass
class Request:
    """Every option of `estimate` besides the model and the method. LoRA's rank, alpha and dropout default to
    `lorakit train`'s (`TRAIN_LORA_DEFAULTS`), the methods' sizes to `MethodOptions`', as in `lorakit train`."""

    task: str | None = None
    r: int = TRAIN_LORA_DEFAULTS["r"]
    alpha: float = TRAIN_LORA_DEFAULTS["alpha"]
    dropout: float = TRAIN_LORA_DEFAULTS["dropout"]
    target_modules: list[str] | str | None = None
    quantize: str | None = None
    dtype: str = "float32"
    optimizer: str = "adamw"
    batch_size: int = 8
    max_length: int = 256
    grad_checkpointing: bool = False
    checkpoint_blocks: int | None = None  # with grad_checkpointing: only the first this many blocks (None: all)
    device: str = "cpu"
    adapter_size: int = _default(MethodOptions, "adapter_size")
    adapter_nonlinearity: str = _default(MethodOptions, "adapter_nonlinearity")
    adapter_norms: bool = _default(MethodOptions, "adapter_norms")  # the layer norms train too: more to hold
    prefix_length: int = _default(MethodOptions, "prefix_length")
    prompt_length: int = _default(MethodOptions, "prompt_length")
    num_labels: int = 2
    simulate: bool = True

    def check(self, method: str) -> None:
        """Refuse an unknown method or option (before any hub lookup)."""
        resolve_method(method, self.quantize)
        for name, value, known in (
            ("dtype", self.dtype, DTYPES),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("device", self.device, DEVICES),
        ):
            if value not in known:
                raise ValueError(f"unknown {name} {value!r}; expected one of: {', '.join(known)}")
        if self.checkpoint_blocks is not None and self.checkpoint_blocks < 0:
            raise ValueError(f"checkpoint_blocks must be 0 or more, got {self.checkpoint_blocks}")
        if self.batch_size < 1 or self.max_length < 1:
            raise ValueError(f"batch size and max length must be positive, got {self.batch_size} and {self.max_length}")

    def method_options(self, default_targets: list[str] | None) -> MethodOptions:
        """The methods' options as `lorakit train` builds them: every field of `MethodOptions` this request has."""
        lora = lora_settings(self.r, self.alpha, self.dropout, self.target_modules, default_targets)
        return MethodOptions(**{name: getattr(self, name) for name in METHOD_OPTION_NAMES}, lora=lora)


@dataclass
class Step:
    """The simulated step's figures (None where the step could not be simulated)."""

    activation_bytes: int | None
    flops: int | None
    forward_flops: int | None
    attention: str
    tensor_peak_bytes: int
    allocator_bytes: int
    notes: list[str] = field(default_factory=list)


def estimate_one(source: Source, method: str, request: Request) -> Estimate:
    request.check(method)
    task = request.task or source.task or default_task(source.config)
    model = build_on_meta(source.config, task, DTYPES[request.dtype], request.num_labels)
    total_parameters = sum(p.numel() for p in unique_parameters(model))
    options = request.method_options(source.default_targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(model, method, task, options, request.quantize, request.batch_size, request.max_length)
        if request.grad_checkpointing:
            enable_checkpointing(model, request.checkpoint_blocks)
    if DTYPES[request.dtype] != torch.float32:
        trainable_to_float32(model)  # float32 master weights over the half-precision base, as lorakit train
    model.train()
    static = weights(model, request.optimizer)
    step = _step(model, prepared, request, static)
    tokens = request.batch_size * (request.max_length + prepared.method.added_positions(options))
    return Estimate(
        model=source.label,
        architecture=type(model).__name__,
        task=task,
        method=method,
        dtype=request.dtype,
        quantize=prepared.quantize,
        optimizer=request.optimizer,
        batch_size=request.batch_size,
        max_length=request.max_length,
        grad_checkpointing=request.grad_checkpointing,
        checkpoint_blocks=request.checkpoint_blocks if request.grad_checkpointing else None,
        device=request.device,
        target_modules=prepared.target_modules,
        total_parameters=total_parameters,
        trainable_parameters=static.trainable_parameters,
        frozen_weight_bytes=static.frozen_bytes,
        trainable_weight_bytes=static.trainable_bytes,
        gradient_bytes=static.trainable_bytes,
        optimizer_bytes=static.optimizer_bytes,
        activation_bytes=step.activation_bytes,
        tensor_peak_bytes=step.tensor_peak_bytes,
        allocator_bytes=step.allocator_bytes,
        total_bytes=step.tensor_peak_bytes + step.allocator_bytes,
        adapter_file_bytes=safetensors_size(prepared.saved_tensors),
        flops_per_step=step.flops,
        forward_flops=step.forward_flops,
        flops_rule=flops_rule(model, tokens, request.batch_size),
        attention=step.attention,
        notes=[*prepared.notes, *step.notes],
    )


def _step(model: nn.Module, prepared: Prepared, request: Request, static: Weights) -> Step:
    """Play the training step on meta, or say why its figures are unknown."""
    cuda = (
        ["not included on CUDA: the CUDA context (about 0.3–1 GB) and the caching allocator's fragmentation"]
        if request.device == "cuda"
        else []
    )
    if not request.simulate:
        return _unsimulated(
            static,
            [
                "training step not simulated: no activations or FLOPs; the total counts "
                "weights, gradients and optimizer state only",
                *cuda,
            ],
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            profile = simulate_training(
                model, prepared.make_batch, request.optimizer, request.device, precision=DTYPES[request.dtype]
            )
    except Exception as err:  # an architecture whose forward pass needs real values
        first = str(err).splitlines()[0] if str(err) else ""
        return _unsimulated(
            static,
            [
                f"activations unknown: the forward pass cannot run on the meta device "
                f"({type(err).__name__}: {first}); the total counts weights, gradients and "
                "optimizer state only",
                *cuda,
            ],
        )
    kind = "quantized" if prepared.quantize else "full" if static.every_parameter_trains else "frozen"
    math_path = (
        [
            "attention runs PyTorch's math path (attention dropout during training on CPU): the B × heads × "
            "T × T probabilities are kept for the backward pass"
        ]
        if profile.attention_path == "math"
        else []
    )
    return Step(
        profile.activation_peak_bytes,
        profile.flops,
        profile.forward_flops,
        profile.attention_path,
        static.frozen_bytes + static.trainable_bytes + profile.peak_bytes,
        allocator_bytes(kind, profile.activation_peak_bytes, request.device),
        [*cuda, *math_path],
    )


def _unsimulated(static: Weights, notes: list[str]) -> Step:
    return Step(None, None, None, "unknown", static.static_bytes, 0, notes)
