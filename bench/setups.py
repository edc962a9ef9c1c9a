"""The training steps the speed benches compare (bench/train_step.py, bench/precision.py), each on a freshly loaded
SmolLM2-135M-Instruct with LoRA r=8 α=16 on q,k,v,o, dropout 0.05, AdamW:

- floor: the frozen model's forward plus the input-gradient half of its backward (gradients reach the input
  embeddings, no weight gets one, no optimizer), with lorakit's loss: what any LoRA step must at least cost;
- lorakit: as its training loop runs (`lorakit.train.fast_paths`, the fused LM head + loss);
- peft: PEFT 0.21.2's LoRA and transformers' own loss;
- full: full fine-tuning with transformers' own loss.

Each step is forward, backward, gradient clipping and the AdamW step (the floor: forward and backward only).
Precision "fp32": everything in float32. "bf16": mixed precision as `lorakit train --precision bf16` runs it —
the forward under `torch.autocast(device, bfloat16)` over a base stored in bfloat16 with float32 adapters
(PEFT: `autocast_adapter_dtype=True`); full fine-tuning keeps float32 master weights of everything it trains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

MODEL = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LIBRARIES = ("floor", "lorakit", "peft", "full")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
Step = Callable[[dict[str, torch.Tensor]], float]


def build(library: str, precision: str = "fp32", device: torch.device | None = None) -> tuple[nn.Module, Step, int]:
    """A freshly loaded model on `device` (CPU by default) prepared for `library` in `precision`, its step
    function (returns the loss; waits for the device) and its number of trainable parameters."""
    from lorakit.device import autocast, trainable_to_float32
    from lorakit.models import load_model

    device = device or torch.device("cpu")
    dtype = PRECISIONS[precision]
    torch.manual_seed(0)
    model, _ = load_model(MODEL, "causal-lm", dtype=dtype)
    model.to(device)
    model, loss_of = _prepare(model, library)
    if library == "full":
        trainable_to_float32(model)  # float32 master weights under mixed precision
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params), f"{library} {precision}: trainable weights not float32"
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None

    def step(batch: dict[str, torch.Tensor]) -> float:
        with autocast(device, dtype):  # nothing at all in fp32
            loss = loss_of(model, batch)
        loss.backward()
        if optimizer is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    return model, step, sum(p.numel() for p in params)


def _prepare(model: nn.Module, library: str) -> tuple[nn.Module, Callable[[Any, dict], torch.Tensor]]:
    """The model made ready for `library`, and how its loss is computed."""
    import lorakit
    from lorakit.train.fast_paths import enable_training_fast_paths
    from lorakit.train.loss import causal_lm_loss

    if library == "floor":
        model.requires_grad_(False)
        enable_training_fast_paths(model)  # the lean gated MLPs (no LoRA layer to group)
        return model, floor_loss
    if library == "lorakit":
        lorakit.add_adapter(model, lorakit.LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=TARGETS))
        enable_training_fast_paths(model)  # as lorakit's training loop does
        return model, causal_lm_loss
    if library == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, config, autocast_adapter_dtype=True)
    elif library != "full":
        raise ValueError(f"unknown set-up {library!r}; expected one of {', '.join(LIBRARIES)}")
    return model, lambda m, batch: m(**batch).loss


def floor_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """lorakit's loss on the frozen model, from input embeddings that want a gradient."""
    from lorakit.train.loss import causal_lm_loss

    inputs = {k: v for k, v in batch.items() if k != "input_ids"}
    inputs["inputs_embeds"] = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    return causal_lm_loss(model, inputs)


def step_flops(step: Step, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one step as PyTorch's formulas count them (matmuls, attention); the step runs once."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops()
