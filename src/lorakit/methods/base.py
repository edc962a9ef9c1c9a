"""What every fine-tuning method shares: its options, the state it leaves on the model, the classification
heads that train beside it, hooks that can be found and removed again, and the numbering of positions
under padding.

A method's own modules are registered on the model under names starting with `lorakit_` (so their
parameters have ordinary names, which the training loop's checkpoints and the method files use), and
its hooks are instances of `MethodHook` holding a reference to the model's `MethodState`, so that
`copy.deepcopy` of a model gives a copy whose hooks act on the copy's own modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..config import LoraConfig
from ..targets import HEAD_NAMES, head_names  # the heads every method trains in full; re-exported here

STATE_ATTR = "_lorakit_method"
MODULE_PREFIX = "lorakit_"
NONLINEARITIES = {"gelu": nn.functional.gelu, "relu": torch.relu, "tanh": torch.tanh}


@dataclass
class MethodOptions:
    """The options of every method (each method reads its own; the rest are ignored)."""

    adapter_size: int = field(default=64, metadata={"help": "method adapter: bottleneck width of each adapter"})
    adapter_nonlinearity: str = field(
        default="gelu",
        metadata={"help": f"method adapter: the bottleneck's nonlinearity ({', '.join(NONLINEARITIES)})"},
    )
    adapter_norms: bool = field(
        default=False,
        metadata={"help": "method adapter: also train the layer norms of every transformer layer (Houlsby et al.)"},
    )
    prefix_length: int = field(default=10, metadata={"help": "method prefix: key/value positions per attention layer"})
    prompt_length: int = field(default=10, metadata={"help": "method prompt: soft-prompt embeddings before the input"})
    # The LoRA method's adapter (lorakit.add_adapter's config); the other methods ignore it.
    lora: LoraConfig | None = field(default=None, metadata={"help": "method lora: the adapter's LoraConfig"})

    def validate(self) -> None:
        for name in ("adapter_size", "prefix_length", "prompt_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.adapter_nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"unknown adapter_nonlinearity {self.adapter_nonlinearity!r}; expected one of "
                f"{', '.join(NONLINEARITIES)}"
            )
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise ValueError(f"lora must be a LoraConfig, got {type(self.lora).__name__}")

    def pick(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The named options as a dict (what a method folder records)."""
        return {name: getattr(self, name) for name in names}


# The options a run or an estimate sets one by one (LoRA's come as a LoraConfig of their own).
METHOD_OPTION_NAMES = tuple(f.name for f in fields(MethodOptions) if f.name != "lora")


@dataclass
class MethodState:
    """Kept on the model (`model._lorakit_method`) while a method is applied."""

    name: str
    options: MethodOptions
    requires_grad: dict[str, bool]  # every parameter's flag before the method, restored when it is removed
    enabled: bool = True  # False: the hooks step aside and the model computes the base model's outputs


def method_state(model: nn.Module) -> MethodState | None:
    return getattr(model, STATE_ATTR, None)


def refuse_second_method(model: nn.Module) -> None:
    """One method at a time: ValueError when the model has a method of this package applied already."""
    existing = method_state(model)
    if existing is not None:
        raise ValueError(f"the model already has the {existing.name!r} method; remove it first (remove_method)")


def described(what: str, counts: tuple[int, int]) -> str:
    """`what`, then how many of the parameters train: the log line of `FineTuningMethod.describe`."""
    trainable, total = counts
    return f"{what} — {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"


def float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def text_config(model: nn.Module) -> Any:
    """The config of the model's text part (a multimodal model's text config, else the model's own)."""
    config: Any = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of layers: the ModuleList as long as num_hidden_layers holding the most parameters."""
    layers = getattr(text_config(model), "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == layers]
    if not lists:
        raise ValueError(f"cannot find the {layers} transformer layers of {type(model).__name__}")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


class MethodHook:
    """Base class of every hook a method installs: found again by type when the method is removed."""

    def __init__(self, state: MethodState) -> None:
        self.state = state


def remove_hooks(model: nn.Module) -> None:
    """Remove every MethodHook from every module of the model.

    Found by type in the modules' hook tables rather than through the handles `register_*_hook` returns:
    a handle keeps pointing at the original module's table after `copy.deepcopy(model)`.
    """
    for module in model.modules():
        tables = (
            (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
            (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
        )
        for hooks, extras in tables:
            for key in [k for k, hook in hooks.items() if isinstance(hook, MethodHook)]:
                del hooks[key]
                for extra in extras:
                    extra.pop(key, None)


def remove_modules(model: nn.Module) -> None:
    """Delete every child module a method registered (names starting with `lorakit_`), at any depth."""
    for module in list(model.modules()):
        for name in [n for n, _ in module.named_children() if n.startswith(MODULE_PREFIX)]:
            delattr(module, name)


def sequence_length(kwargs: dict) -> int:
    source = kwargs.get("input_ids")
    if source is None:
        source = kwargs.get("inputs_embeds")
    if source is None:
        raise ValueError("the model was called without input_ids or inputs_embeds")
    return source.shape[1]


def mask_positions(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Position ids of the last `length` columns of a 2-D attention mask: every row's tokens numbered from 0 at
    its first real token, whatever the padding (padding gets 0). The numbering `generate` uses."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, -length:]


def calling_kwargs(args: tuple, kwargs: dict) -> dict:
    """A model call's arguments as keywords (a first positional argument is the input ids)."""
    if len(args) > 1:
        raise ValueError(
            "with a prefix or prompt, call the model with keyword arguments (input_ids=..., attention_mask=...)"
        )
    return {"input_ids": args[0], **kwargs} if args else dict(kwargs)


class PositionsFromMask(MethodHook):
    """Forward pre-hook on the model: when position ids are not given, derive them from the attention mask.

    Prefix keys and values carry no position, so how the query positions are numbered changes what a token
    sees of them; numbering from each row's first real token keeps a left-padded row equal to the row alone
    (`generate` numbers positions this way already)."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self.state.enabled or kwargs.get("position_ids") is not None:
            return None
        kwargs = calling_kwargs(args, kwargs)
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            return None
        kwargs["position_ids"] = mask_positions(mask, sequence_length(kwargs))
        return (), kwargs


__all__ = [
    "HEAD_NAMES",
    "MODULE_PREFIX",
    "MethodHook",
    "MethodOptions",
    "MethodState",
    "PositionsFromMask",
    "calling_kwargs",
    "described",
    "float_dtype",
    "head_names",
    "mask_positions",
    "method_state",
    "refuse_second_method",
    "remove_hooks",
    "remove_modules",
    "sequence_length",
    "text_config",
    "transformer_blocks",
]
