"""Where each adapter is: on the model (in the batched stacks that requests run through), in host memory (a CPU
copy of its config and factors), or only in its folder on disk — and which one moves when room is needed.

Every adapter version has a host copy while it is on the model or held by a request, so that making room never
loses weights: the least recently used version on the model that no running sequence uses and that is not
pinned is taken off the model (`max_loaded`; versions that queued requests hold go last), and beyond `max_host`
copies of versions off the model, the least recently used one nobody holds is dropped (read from disk again on
its next use). A reload creates a new version of a name (its model key `name@2`, `name@3`, ...); the old one is
retired and leaves once nothing holds it.

Locking: `model_lock` (the registry's `lock`, which the scheduler holds for each forward pass) guards the model;
`state` guards the bookkeeping. Methods that change the model want `model_lock` held by the caller and take
`state` briefly, never the other way round.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LoraConfig
from ..inject import delete_adapter
from ..io import load_adapter
from .metrics import Metrics

Adapter = tuple[LoraConfig, dict[str, torch.Tensor]]  # what `lorakit.io.read_adapter` returns


@dataclass(eq=False)
class Version:
    """One set of weights of a named adapter. `key` is its name on the model; `read` reads it from disk again."""

    name: str
    key: str
    read: Callable[[], Adapter]
    adapter: Adapter | None = None  # the host copy
    on_model: bool = False
    pinned: bool = False
    retired: bool = False  # a reload replaced it: it leaves once `holders` is 0
    holders: int = 0  # requests queued or running with it
    active: int = 0  # sequences of it in the running batch
    last_used: float = field(default_factory=time.monotonic)


class Residency:
    def __init__(
        self,
        model: nn.Module,
        model_lock: threading.RLock,
        state: threading.Condition,
        metrics: Metrics,
        max_loaded: int | None,
        max_host: int | None,
    ) -> None:
        self.model, self.model_lock, self.state, self.metrics = model, model_lock, state, metrics
        self.max_loaded, self.max_host = max_loaded, max_host
        self.versions: dict[str, Version] = {}  # by key

    def tiers(self) -> dict[str, int]:
        """How many versions are on the model, in host memory only, and on disk only."""
        with self.state:
            versions = list(self.versions.values())
        return {
            "model": sum(v.on_model for v in versions),
            "host": sum(not v.on_model and v.adapter is not None for v in versions),
            "disk": sum(not v.on_model and v.adapter is None for v in versions),
        }

    def place(self, version: Version) -> bool:
        """Put `version` on the model (caller holds `model_lock`), making room if needed; False when every
        version on the model is running or pinned."""
        with self.state:
            version.last_used = time.monotonic()
            if version.on_model:
                return True
            full = self.max_loaded is not None and sum(v.on_model for v in self.versions.values()) >= self.max_loaded
        if full and not self._evict_one():
            return False
        self._load(version)
        return True

    def _load(self, version: Version) -> None:
        if version.adapter is None:
            raise RuntimeError(f"adapter {version.name!r} has no host copy to load")  # held versions keep theirs
        load_adapter(self.model, version.adapter, name=version.key, activate=False)
        with self.state:
            version.on_model = True
        self.metrics.adapter_loaded(version.name, "host")

    def add(self, version: Version) -> None:
        """A new version with its host copy: put on the model (so that a misfit is found now; caller holds
        `model_lock`), then the limits are restored where they can be."""
        self._load(version)
        with self.state:
            self.versions[version.key] = version
        self.tidy()

    def _evict_one(self) -> bool:
        with self.state:
            candidates = [v for v in self.versions.values() if v.on_model and not v.pinned and v.active == 0]
            if not candidates:
                return False
            victim = min(candidates, key=lambda v: (v.holders > 0, v.last_used))
            victim.on_model = False
        delete_adapter(self.model, victim.key)
        self.metrics.adapter_evicted(victim.name, "host")
        self._trim_host()
        return True

    def _trim_host(self) -> None:
        with self.state:
            host_only = [v for v in self.versions.values() if not v.on_model and v.adapter is not None]
            excess = len(host_only) - self.max_host if self.max_host is not None else 0
            dropped = sorted((v for v in host_only if v.holders == 0), key=lambda v: v.last_used)[: max(excess, 0)]
            for version in dropped:
                version.adapter = None
        for version in dropped:
            self.metrics.adapter_evicted(version.name, "disk")

    def tidy(self) -> None:
        """Remove retired versions nobody holds, then take versions off the model down to `max_loaded` where some
        are idle (caller holds `model_lock`)."""
        with self.state:
            gone = [v for v in self.versions.values() if v.retired and v.holders == 0]
            for version in gone:
                del self.versions[version.key]
        for version in gone:
            if version.on_model:
                delete_adapter(self.model, version.key)
        while self.max_loaded is not None:
            with self.state:
                over = sum(v.on_model for v in self.versions.values()) > self.max_loaded
            if not over or not self._evict_one():
                break

    def remove(self, version: Version) -> None:
        """Forget a version nobody holds (an unload; caller holds `model_lock`)."""
        with self.state:
            self.versions.pop(version.key, None)
            on_model, version.on_model, version.adapter = version.on_model, False, None
        if on_model:
            delete_adapter(self.model, version.key)
