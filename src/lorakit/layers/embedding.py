"""LoRA on `nn.Embedding`: A is an (r × vocab) table looked up by token id, B maps r → embedding dim.

Stored as bare parameters named `lora_embedding_A` / `lora_embedding_B`, as PEFT stores them. No
dropout: the input is a token index, not a vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer


class LoraEmbedding(LoraLayer):
    adapter_containers = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    @property
    def in_features(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def out_features(self) -> int:
        return self.base_layer.embedding_dim

    def adapter_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        return {"lora_embedding_A": (r, self.in_features), "lora_embedding_B": (self.out_features, r)}

    def _create_adapter(self, name: str, r: int) -> None:
        for container, shape in self.adapter_shapes(r).items():
            getattr(self, container)[name] = nn.Parameter(torch.empty(shape))

    def reset_adapter(self, name: str, init: str) -> None:
        # A kaiming init sized for a (r × vocab) matrix would make lookups tiny; rows of N(0, 1) (or
        # N(0, 1/r²)) keep the r-dimensional code of each token on the scale of an embedding.
        with torch.no_grad():
            std = 1.0 / self.rank[name] if init == "gaussian" else 1.0
            nn.init.normal_(self.lora_embedding_A[name], std=std)
            nn.init.zeros_(self.lora_embedding_B[name])

    def to_matrix_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T  # the table is (vocab, dim): (in, out)

    def to_base_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T

    def low_rank_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        codes = F.embedding(
            x,
            self.lora_embedding_A[name].T,
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )
        return codes @ self.lora_embedding_B[name].T * self.scaling[name]
