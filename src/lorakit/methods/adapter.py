"""Adapter layers (Houlsby et al. 2019): in every transformer layer, a bottleneck after the attention
output projection and another after the MLP output projection, each x + W_up·f(W_down·x + b_down) + b_up,
inside the residual branch (before the layer's own residual addition and layer norm).

The up-projection starts at zero, so the model starts as exactly the base model; the down-projection
has nn.Linear's default initialisation (as LoRA's A). With `adapter_norms`, the layers' own layer norms
train too, as in the paper. The adapters are modules of the transformer layer (`lorakit_adapter_attn`,
`lorakit_adapter_mlp`), applied by forward hooks on the two projections, so the base weights keep their
names and values.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import NONLINEARITIES, MethodHook, MethodOptions, MethodState, float_dtype, text_config, transformer_blocks

OPTIONS = ("adapter_size", "adapter_nonlinearity", "adapter_norms")
# Paths, inside one transformer layer, of the attention output and MLP output projections.
ATTENTION_OUTPUTS = ("self_attn.o_proj", "attention.output.dense", "attn.c_proj", "self_attn.out_proj", "attn.out_proj")
MLP_OUTPUTS = ("mlp.down_proj", "output.dense", "mlp.c_proj", "mlp.fc2", "fc2")


class Bottleneck(nn.Module):
    def __init__(self, width: int, size: int, nonlinearity: str, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.down = nn.Linear(width, size, dtype=dtype, device=device)
        self.up = nn.Linear(size, width, dtype=dtype, device=device)
        self.nonlinearity = nonlinearity
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(NONLINEARITIES[self.nonlinearity](self.down(x)))


class _After(MethodHook):
    """Forward hook on a projection: its output goes through the adapter."""

    def __init__(self, state: MethodState, adapter: Bottleneck) -> None:
        super().__init__(state)
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor):
        return self.adapter(output) if self.state.enabled else None


def _find(block: nn.Module, paths: tuple[str, ...], what: str, index: int) -> nn.Module:
    modules = dict(block.named_modules())
    for path in paths:
        if path in modules:
            return modules[path]
    raise ValueError(
        f"adapter: cannot find the {what} output projection in layer {index} "
        f"({type(block).__name__}); looked for {', '.join(paths)}"
    )


def apply(model: nn.Module, options: MethodOptions, state: MethodState) -> None:
    blocks = transformer_blocks(model)
    places = [
        (_find(b, ATTENTION_OUTPUTS, "attention", i), _find(b, MLP_OUTPUTS, "MLP", i)) for i, b in enumerate(blocks)
    ]
    width, dtype = text_config(model).hidden_size, float_dtype(model)
    for block, (attention_out, mlp_out) in zip(blocks, places):
        device = next(block.parameters()).device
        shape = (width, options.adapter_size, options.adapter_nonlinearity, dtype, device)
        block.lorakit_adapter_attn, block.lorakit_adapter_mlp = Bottleneck(*shape), Bottleneck(*shape)
        attention_out.register_forward_hook(_After(state, block.lorakit_adapter_attn))
        mlp_out.register_forward_hook(_After(state, block.lorakit_adapter_mlp))
        if options.adapter_norms:
            for module in block.modules():
                if "norm" in type(module).__name__.lower():
                    for param in module.parameters():
                        param.requires_grad_(True)
