"""Plan before you train: memory, storage and FLOPs of fine-tuning a model, from its config alone.

    from lorakit.estimation import estimate, compare
    est = estimate("smollm2-135m", method="lora", batch_size=4, max_length=128)
    print(est.total_bytes / 1e9, "GB")
    for e in compare("meta-llama/Llama-2-7b-hf", batch_size=1, max_length=2048, dtype="bfloat16"): ...

How the figures are obtained (assumptions in full):

* The model is built from its config on the `meta` device (no weights read, no memory used), and the
  method of `lorakit.methods` is applied to it for real (`methods.py`): parameter counts are those of the
  instantiated model. Options not given take the defaults of `LoraConfig` (rank, alpha) and `MethodOptions`
  (adapter size, prefix and prompt lengths), with lorakit train's LoRA dropout (0.05); LoRA targets the
  built-in model's target modules, else all linear layers. A quantized base (`quantize`, or `qlora`) is
  LoRA's only (QLoRA), as in `lorakit train`.
* Frozen weights: every parameter that does not train, plus buffers, in `dtype` — the precision, as
  `lorakit train --precision` takes it: fp32, bf16 or fp16 (or torch's spelling) — with quantized linear
  layers at their stored size (NF4 ≈ 4.127 bits, int8 8 bits + a 32-bit scale per row). Trainable weights
  are float32 master weights at every precision, as in training, and so are their gradients and the
  optimizer state (PyTorch keeps AdamW's two moments and SGD's momentum in the parameter's dtype):
  weights + gradients + optimizer = 4 copies with AdamW, 3 with SGD with momentum.
* Activations and the peak: the steady-state training step `lorakit train` runs (forward with the lean
  gated MLPs and the fused LM-head loss where they apply, under autocast below fp32; backward, clipping,
  optimizer step, with the optimizer state already created) is played on meta with the real
  transformers code (`simulate.py`, `autocast.py`), following every tensor's lifetime: the peak of live
  bytes (saved activations, temporaries, gradients as they appear, optimizer state) over the step.
  Batches are full length (no padding). This tensor peak matches a real CPU step byte for byte in float32
  and for LoRA over a bf16 Llama, within 3 % elsewhere below fp32 (tests/estimation/test_estimate.py), and
  the measured peak RSS within a few percent when malloc returns freed memory at once. With glibc's
  default malloc the process keeps freed blocks for reuse, so on CPU the total adds `CPU_RUNTIME_BYTES`
  and `CPU_MALLOC_SLACK` (a fixed part + a share of the activation peak, by kind of method), calibrated
  against measured peaks (bench/estimate_vs_measured.py). On CUDA add the CUDA context (~0.3–1 GB) and
  the caching allocator's fragmentation: not modelled.
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

from typing import Any

from transformers import PretrainedConfig

from .costs import CPU_MALLOC_SLACK, CPU_RUNTIME_BYTES, DEVICES, OPTIMIZERS
from .methods import METHODS, quantizable
from .plan import Request, estimate_one
from .resolve import resolve_source
from .result import Estimate

__all__ = [
    "CPU_MALLOC_SLACK",
    "CPU_RUNTIME_BYTES",
    "DEVICES",
    "Estimate",
    "METHODS",
    "OPTIMIZERS",
    "compare",
    "estimate",
]
_DEFAULTS = Request()


def estimate(
    model: str | PretrainedConfig | dict[str, Any],
    method: str = "lora",
    *,
    task: str | None = _DEFAULTS.task,
    r: int = _DEFAULTS.r,
    alpha: float = _DEFAULTS.alpha,
    dropout: float = _DEFAULTS.dropout,
    target_modules: list[str] | str | None = _DEFAULTS.target_modules,
    quantize: str | None = _DEFAULTS.quantize,
    dtype: str = _DEFAULTS.dtype,
    optimizer: str = _DEFAULTS.optimizer,
    batch_size: int = _DEFAULTS.batch_size,
    max_length: int = _DEFAULTS.max_length,
    grad_checkpointing: bool = _DEFAULTS.grad_checkpointing,
    checkpoint_blocks: int | None = _DEFAULTS.checkpoint_blocks,
    device: str = _DEFAULTS.device,
    adapter_size: int = _DEFAULTS.adapter_size,
    adapter_nonlinearity: str = _DEFAULTS.adapter_nonlinearity,
    adapter_norms: bool = _DEFAULTS.adapter_norms,
    prefix_length: int = _DEFAULTS.prefix_length,
    prompt_length: int = _DEFAULTS.prompt_length,
    num_labels: int = _DEFAULTS.num_labels,
    simulate: bool = _DEFAULTS.simulate,
) -> Estimate:
    """Estimate memory, adapter size and FLOPs of training `model` with `method`, without loading weights.

    model: a built-in name, a folder with config.json, a JSON config file, a .gguf file, a hub id, a
    `PretrainedConfig` or a config dict (with `model_type`). method: one of `METHODS`. The defaults are
    described in the module docstring. `simulate=False` skips the simulated step: parameter, weight,
    optimizer and file figures only. Raises ValueError for an unknown model, option or an architecture that
    cannot be built on meta.
    """
    request = Request(
        task=task,
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_modules=target_modules,
        quantize=quantize,
        dtype=dtype,
        optimizer=optimizer,
        batch_size=batch_size,
        max_length=max_length,
        grad_checkpointing=grad_checkpointing,
        checkpoint_blocks=checkpoint_blocks,
        device=device,
        adapter_size=adapter_size,
        adapter_nonlinearity=adapter_nonlinearity,
        adapter_norms=adapter_norms,
        prefix_length=prefix_length,
        prompt_length=prompt_length,
        num_labels=num_labels,
        simulate=simulate,
    )
    request.check(method)  # before any hub lookup
    return estimate_one(resolve_source(model), method, request)


def compare(
    model: str | PretrainedConfig | dict[str, Any], methods: list[str] | None = None, **options: Any
) -> list[Estimate | str]:
    """`estimate` for each method (default: all of `METHODS`) with the same options; a method that does not
    train on a quantized base is shown on the float base, and a method that does not apply (BitFit on a
    model without biases) gives the reason as a string in its place."""
    requests = {name: _request_for(name, options) for name in methods or METHODS}
    for name, request in requests.items():  # bad options fail every method alike: raise them, before any hub lookup
        request.check(name)
    source = resolve_source(model)
    results: list[Estimate | str] = []
    for name, request in requests.items():
        try:
            results.append(estimate_one(source, name, request))
        except ValueError as err:  # the method does not apply to this model
            results.append(f"{name}: {err}")
    return results


def _request_for(method: str, options: dict[str, Any]) -> Request:
    request = Request(**options)
    if method in METHODS and not quantizable(method):
        request.quantize = None
    return request
