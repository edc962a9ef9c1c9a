"""The causal-LM training loss without the full logits: only the positions that have a target, and the
output projection + cross-entropy fused in chunks.

`model(**batch).loss` builds batch × length × vocabulary logits (SmolLM2: 49152 columns, 400 MB at
4 × 512 tokens), a log-softmax of the same size for the backward pass, and a gradient of that size again,
and multiplies every prompt and padding position through the output layer although only target
positions count. `causal_lm_loss` runs the model's backbone, keeps the hidden states of the positions
that predict a target token, and hands them to `linear_cross_entropy`, which walks through them a chunk at
a time: logits of one chunk, their log-sum-exp, the loss terms, and at once the gradient of the hidden
states (and of the output weight when it trains), since for a loss that ends the graph
∂loss/∂logits = softmax − one-hot is known in the forward pass. Peak memory for the head is one chunk of
logits; the arithmetic is the two products the plain path also does, on fewer rows.

It applies to architectures whose causal-LM head is exactly `lm_head(hidden)` (no logit soft-capping or
scaling) when the head is a plain `nn.Linear`, and never under FSDP (whose root hooks must see the
model's own forward); everywhere else `causal_lm_loss` returns `model(**batch).loss`.

Label smoothing ε (`torch.nn.functional.cross_entropy`'s): each row's loss is (1 − ε)·(−log p_target) +
ε·mean_j(−log p_j) over the V classes, so with z the logits and lse their log-sum-exp

    loss_i = lse_i − (1 − ε)·z_i[t_i] − ε·mean_j z_ij,     ∂loss_i/∂z_i = softmax(z_i) − (1 − ε)·onehot(t_i) − ε/V.

The LoRA paper trains E2E with ε = 0.1. Without the fused head, ε > 0 takes the model's logits and
`cross_entropy` (classification too); a regression head has no classes to smooth over.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .data import IGNORE_INDEX

# Model types whose `...ForCausalLM.forward` computes logits as `lm_head(last_hidden_state)`.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "olmo2", "smollm3"})
CHUNK_ELEMENTS = 2**24  # logits held at once: 64 MB in float32


class LinearCrossEntropy(torch.autograd.Function):
    """Σ_i [logsumexp(z_i) − (1 − ε)·z_i[t_i] − ε·mean_j z_ij] over rows i, z_i = h_i·Wᵀ + b, computed `chunk` rows
    at a time (ε: label smoothing, 0 for plain cross-entropy)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
        smoothing: float = 0.0,
    ) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16 models still get float32 softmax
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if bias is not None and ctx.needs_input_grad[2] else None
        total = hidden.new_zeros((), dtype=acc)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h, t = hidden[rows], targets[rows]
            logits = (h @ weight.t()).to(acc)
            if bias is not None:
                logits += bias.to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - (1.0 - smoothing) * logits.gather(1, t[:, None]).squeeze(1)).sum()
            if smoothing:
                total -= smoothing * logits.mean(dim=-1).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[torch.arange(len(t), device=t.device), t] -= 1.0 - smoothing
            if smoothing:
                probs -= smoothing / logits.shape[-1]
            if grad_hidden is not None:
                grad_hidden[rows] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += probs.t() @ h.to(acc)
            if grad_bias is not None:
                grad_bias += probs.sum(0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_total if present else None for present in ctx.present]
        if grads[1] is not None:
            grads[1] = grads[1].to(ctx.dtypes[0])
        if grads[2] is not None:
            grads[2] = grads[2].to(ctx.dtypes[1])
        return grads[0], grads[1], grads[2], None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int | None = None,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """Summed cross-entropy of `targets` (N) under logits hidden (N × d) · weightᵀ (+ bias), with label smoothing
    `smoothing`, never holding more than `chunk` rows of logits (default: 2**24 logits)."""
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, smoothing)


def fused_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(backbone, output layer) when `causal_lm_loss` can fuse this model's head, else None."""
    from torch.distributed.fsdp import FSDPModule

    config = getattr(model, "config", None)
    if (
        config is None
        or getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES
        or isinstance(model, FSDPModule)
    ):
        return None
    if any(getattr(config, key, None) not in (None, 1.0) for key in ("final_logit_softcapping", "logit_scale")):
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    backbone = getattr(model, "base_model", None)
    if type(head) is not nn.Linear or backbone is None or backbone is model:
        return None
    return backbone, head


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the target tokens of `batch` (labels −100 ignored), equal to `model(**batch).loss`
    without label smoothing; with it, `cross_entropy(..., label_smoothing=...)` of the same logits. A batch of
    class labels (one per row) is scored the same way."""
    parts = fused_head(model) if "labels" in batch and batch["labels"].dim() == 2 else None
    if parts is None:
        return model(**batch).loss if not label_smoothing else _smoothed_loss(model, batch, label_smoothing)
    backbone, head = parts
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    total = linear_cross_entropy(hidden[:, :-1][keep], head.weight, head.bias, targets[keep], smoothing=label_smoothing)
    return total / keep.sum().clamp(min=1)


def _smoothed_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], smoothing: float) -> torch.Tensor:
    """Label-smoothed cross-entropy from the model's logits: next-token targets (labels of the batch's shape) or one
    class per row. Refuses what has no classes (a regression head)."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    if labels.dim() == 2 and logits.dim() == 3:  # causal LM: position i predicts token i + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    if labels.is_floating_point() or logits.shape[-1] < 2:
        raise ValueError("label smoothing needs classes: this task's labels are numbers (regression)")
    # At least float32, as transformers' own loss computes its softmax (bf16 logits are cast up).
    flat = logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32))
    return nn.functional.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, label_smoothing=smoothing)
