"""The LoRA paper's analysis tools (Section 7) for saved adapters.

- `subspace.py`: subspace similarity φ(A₁, A₂, i, j) between two adapters' factors;
- `spectrum.py`: the exact SVD of ΔW = s·B·A from its factors, entropy and energy effective ranks;
- `weights.py`: ΔW vs W, ‖UᵀWVᵀ‖_F along ΔW's, W's and random directions, and the amplification factor;
- `adapters.py`: adapter folders → per-layer factors, the base weights in (out × in) layout, compatibility checks;
- `plots.py`: heat maps and spectrum plots; `report.py`: all of it for a folder, as JSON, markdown and PNGs.

    report = lorakit.analyze_adapter("runs/r8", compare="runs/r64")
    lorakit.analysis.write_report(report, "runs/r8/analysis")
"""

from .report import analyze_adapter, markdown, write_report
from .spectrum import SVD, delta_svd, effective_rank, energy_rank
from .subspace import random_baseline, singular_basis, subspace_similarity
from .weights import DeltaVsWeight, delta_vs_weight, projection_norm, random_directions

__all__ = [
    "DeltaVsWeight",
    "SVD",
    "analyze_adapter",
    "delta_svd",
    "delta_vs_weight",
    "effective_rank",
    "energy_rank",
    "markdown",
    "projection_norm",
    "random_baseline",
    "random_directions",
    "singular_basis",
    "subspace_similarity",
    "write_report",
]
