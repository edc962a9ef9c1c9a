"""The arithmetic of the LoRA variants that depend on the base weight: PiSSA / OLoRA initialisation and DoRA.

Every function works on matrices in the (out, in) layout of `nn.Linear.weight`; the layer classes transpose
GPT-2's (in, out) `Conv1D` weights before calling them.

PiSSA (Meng et al. 2024): W0 = U S Vᵀ; the adapter starts at the principal part,
    B0 = U_r · diag(√(S_r / s)),  A0 = diag(√(S_r / s)) · V_rᵀ,  so that  s·B0·A0 = U_r S_r V_rᵀ.
OLoRA (Büyükakyüz 2024): W0 = Q R;  B0 = Q[:, :r],  A0 = R[:r].
In both the frozen part is the residual W0 − s·B0·A0, so the model starts exactly as the base. lorakit never
writes the residual into the base weight: it keeps W0 and subtracts s·B0·A0·x as a frozen low-rank term,
which is the same function (the adapter's update relative to W0 is s·(B·A − B0·A0)).

DoRA (Liu et al. 2024): W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖, the norm of each output feature's row (PEFT's
`torch.linalg.norm(weight, dim=1)` on the (out, in) matrix; the paper's "column-wise" for its (in, out)
convention). The norm is treated as a constant in the backward pass, as the paper suggests (section 4.3).
"""

from __future__ import annotations

import torch


def pissa_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) from the top-r singular triplets of `weight` (out, in), computed in float32."""
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) = (R[:r], Q[:, :r]) of the reduced QR decomposition of `weight` (out, in), in float32."""
    q, rr = torch.linalg.qr(weight.detach().to(torch.float32))
    return rr[:r].contiguous(), q[:, :r].contiguous()


def weight_init_factors(init: str, weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    if init == "pissa":
        return pissa_factors(weight, r, scaling)
    if init == "olora":
        return olora_factors(weight, r)
    raise ValueError(f"{init!r} is not an initialisation computed from the base weight")


def row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """‖W + ΔW‖ of every row (output feature) of the (out, in) matrices: DoRA's denominator."""
    return torch.linalg.norm(weight + delta, dim=1)


def dora_merged_delta(weight: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """What merging a DoRA adapter adds to the unmerged weight W0: f ⊙ (W0 + ΔW) − W0 with f = m / ‖W0 + ΔW‖."""
    return (factor - 1)[:, None] * weight + factor[:, None] * delta


def unmerged_weight(
    weight: torch.Tensor, plain_deltas: list[torch.Tensor], dora_terms: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """W0 recovered from a weight that holds merged adapters.

    W = W0 + Σ_plain ΔW_j + Σ_dora [(f_k − 1) ⊙ W0 + f_k ⊙ ΔW_k], so row by row
    W0 = (W − Σ ΔW_j − Σ f_k ⊙ ΔW_k) / (1 + Σ (f_k − 1)). `dora_terms` holds (ΔW_k, f_k) of each merged DoRA
    adapter, f_k being the factor used when it was merged.
    """
    numerator = weight.clone()
    denominator = torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device)
    for delta in plain_deltas:
        numerator -= delta
    for delta, factor in dora_terms:
        numerator -= factor[:, None] * delta
        denominator += factor - 1
    return numerator / denominator[:, None]
