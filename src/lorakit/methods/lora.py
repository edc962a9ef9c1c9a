"""LoRA as a `FineTuningMethod`, over lorakit's own LoRA functions (`add_adapter`, `save_adapter`,
`load_adapter`, `merge`/`unmerge`, `disable_adapters`), its folders in PEFT's adapter format.

The adapter's `LoraConfig` comes in `MethodOptions.lora`. As with the other methods, a classification head
(`classifier` / `score`) trains in full beside the adapter: when the config names no `modules_to_save`,
the model's heads are saved and trained as PEFT's `modules_to_save`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inject import add_adapter, delete_adapter, disable_adapters, merge, trainable_parameters, unmerge
from ..io import PREFIX, load_adapter, save_adapter
from ..state import active_adapters, adapter_config, adapter_names
from ..targets import head_names
from .base import MethodOptions, described, refuse_second_method

# The requires_grad flag of every parameter before the first adapter came, given back by `remove`.
FLAGS_ATTR = "_lorakit_flags_before_lora"


@dataclass(frozen=True)
class LoraMethod:
    """LoRA behind the `FineTuningMethod` protocol, working on the adapter named `adapter`."""

    adapter: str = "default"
    name: str = "lora"
    mergeable: bool = True
    quantizable_base: bool = True  # QLoRA: the adapter trains in float beside the frozen quantized weights

    def apply(self, model: nn.Module, options: MethodOptions) -> tuple[int, int]:
        options.validate()
        if options.lora is None:
            raise ValueError(
                "the lora method needs its adapter's config, MethodOptions(lora=LoraConfig(...)), "
                "as lorakit.add_adapter(model, LoraConfig(...)) does"
            )
        refuse_second_method(model)
        config = options.lora
        if config.modules_to_save is None and head_names(model):
            config = replace(config, modules_to_save=head_names(model))
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            add_adapter(model, config, self.adapter)
        except TypeError as err:  # a target of a layer type LoRA does not support
            raise ValueError(str(err)) from None
        model.__dict__.setdefault(FLAGS_ATTR, flags)
        return trainable_parameters(model)

    def added_positions(self, options: MethodOptions) -> int:
        return 0

    def describe(self, model: nn.Module) -> str:
        config = adapter_config(model, self._adapter_of(model))
        return described(
            f"adapter: r={config.r} alpha={config.alpha} on {config.target_modules}", trainable_parameters(model)
        )

    def file_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # The keys `save_adapter` writes: PEFT's prefix, without the adapter-name components of the paths.
        dropped = {self._adapter_of(model), "modules_to_save"}
        return {
            PREFIX + ".".join(p for p in n.split(".") if p not in dropped): t
            for n, t in model.named_parameters()
            if t.requires_grad
        }

    def save(self, model: nn.Module, folder: str | os.PathLike, *, write: bool = True, **meta: Any) -> Path:
        return save_adapter(model, folder, self._adapter_of(model), write=write, **meta)

    def restore(self, model: nn.Module, folder: str | os.PathLike) -> None:
        # New parameters with the checkpoint's values: an optimizer must be built after this.
        if self.adapter in adapter_names(model):
            delete_adapter(model, self.adapter)
        load_adapter(model, folder, self.adapter)

    def load(self, model: nn.Module, folder: str | os.PathLike) -> None:
        refuse_second_method(model)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        load_adapter(model, folder, self.adapter)
        model.__dict__.setdefault(FLAGS_ATTR, flags)

    @contextmanager
    def merged(self, model: nn.Module) -> Iterator[nn.Module]:
        merge(model)
        try:
            yield model
        finally:
            unmerge(model)

    def disabled(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        return disable_adapters(model)

    def remove(self, model: nn.Module) -> None:
        names = adapter_names(model)
        if not names:
            raise ValueError("the model has no LoRA adapters to remove")
        for name in names:
            delete_adapter(model, name)
        flags = model.__dict__.pop(FLAGS_ATTR, {})
        for name, param in model.named_parameters():
            param.requires_grad_(flags.get(name, param.requires_grad))

    # -- internals ---------------------------------------------------------------------------------
    def _adapter_of(self, model: nn.Module) -> str:
        """This method's adapter, or the model's only active adapter when it has another name."""
        if self.adapter in adapter_names(model):
            return self.adapter
        active = active_adapters(model)
        if len(active) != 1:
            known = ", ".join(adapter_names(model)) or "none"
            raise ValueError(f"the model has no LoRA adapter {self.adapter!r} (adapters: {known})")
        return active[0]
