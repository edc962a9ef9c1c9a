"""The adapters a server runs, by name: which exist, where they are read from, which requests hold them, and
loading, reloading and unloading them at run time.

Adapters named at start-up come from the operator's command line. Adapters loaded at run time (the admin API, or
a request naming an unknown adapter that is a folder in an allowed folder, unless auto-loading is off) come only
from inside the folders the operator allowed (`--adapter-dir`), read as `allowed_files` reads them. A request
holds its adapter's version from the moment it is queued until it finishes: a reload gives the name new weights
for the requests that come after it, while those in flight finish on the old ones; unloading waits until
nothing holds the adapter (new requests for it are refused meanwhile). How many adapters stay on the model and in
host memory is `residency.py`'s business; reading an adapter back from disk happens in `acquire`, which request
handlers call in a worker thread. Every change to the model happens under `lock`, which the scheduler also holds
for each forward pass.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..io import read_adapter
from .allowed_files import allowed_folder, read_allowed_adapter
from .metrics import Metrics
from .residency import Adapter, Residency, Version

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class ModelNotFound(KeyError):
    """A request names a model (adapter) the server does not have."""


class Conflict(RuntimeError):
    """A name that is taken, or an unload that could not finish."""


def check_adapter(adapter: Adapter, shown: str) -> None:
    """Refuse an adapter the server cannot batch with others (`shown` names it in the message)."""
    config = adapter[0]
    if config.modules_to_save or config.bias != "none":
        raise ValueError(
            f"adapter at {shown!r} trains modules_to_save or biases, which every request "
            "would share; the server runs adapters that only add low-rank matrices"
        )
    if config.task_type not in (None, "CAUSAL_LM"):
        raise ValueError(f"adapter at {shown!r} is for task {config.task_type}, not a causal LM")


class Registry:
    def __init__(
        self,
        model: nn.Module,
        base_name: str,
        adapter_dirs: list[Path] | tuple = (),
        unload_timeout: float = 600.0,
        *,
        metrics: Metrics | None = None,
        max_loaded: int | None = None,
        max_host: int | None = None,
        pinned: tuple[str, ...] = (),
        auto_load: bool = True,
    ) -> None:
        self.base_name = base_name
        self.roots = [Path(d).expanduser().resolve() for d in adapter_dirs]
        for root in self.roots:
            if not root.is_dir():
                raise FileNotFoundError(f"adapter folder {root} does not exist")
        self.unload_timeout = unload_timeout
        self.pinned, self.auto_load = set(pinned), auto_load
        self.metrics = metrics or Metrics()
        self.lock = threading.RLock()  # the model: loads, unloads and forward passes
        self._state = threading.Condition()  # the bookkeeping below and the versions' counts
        self.residency = Residency(model, self.lock, self._state, self.metrics, max_loaded, max_host)
        self._current: dict[str, Version] = {}
        self._reserved: set[str] = set()  # names being loaded
        self._unloading: set[str] = set()
        self._serial: dict[str, int] = {}

    # -- what exists ------------------------------------------------------------------------------
    def adapters(self) -> list[str]:
        with self._state:
            return [n for n in self._current if n not in self._unloading]

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters()]

    def may_serve(self, name: str) -> bool:
        """Whether `name` is the base model, an adapter, or may be loaded on first use (not checked on disk)."""
        return name in self.model_names() or bool(self.auto_load and self.roots and NAME_PATTERN.fullmatch(name))

    def in_use(self) -> dict[str, int]:
        """Every adapter with the number of queued or running requests that hold it (any of its versions)."""
        with self._state:
            held = {name: 0 for name in self._current}
            for version in self.residency.versions.values():
                if version.name in held:
                    held[version.name] += version.holders
            return held

    def tier(self, name: str) -> str:
        """Where the adapter's current version is: "model", "host" or "disk"."""
        with self._state:
            version = self._current[name]
            return "model" if version.on_model else "host" if version.adapter is not None else "disk"

    def not_found(self, name: str) -> ModelNotFound:
        return ModelNotFound(f"model {name!r} does not exist; available models: {', '.join(self.model_names())}")

    # -- requests ---------------------------------------------------------------------------------
    def acquire(self, model_name: str, count: int = 1) -> str | None:
        """The model key of the adapter a request's `model` field selects (None: the base model), held `count`
        times until as many `release` calls. Loads an unknown adapter from an allowed folder (auto-loading), and
        reads one whose host copy was dropped from disk again: call it off the event loop."""
        if model_name == self.base_name:
            return None
        if self._needs_auto_load(model_name):
            self._auto_load(model_name)
        with self._state:
            while model_name in self._reserved:  # another request is loading it
                self._state.wait()
            version = self._current.get(model_name)
            if version is None or model_name in self._unloading:
                raise self.not_found(model_name)
            version.holders += count
            hit, missing = version.on_model, version.adapter is None
        self.metrics.adapter_requested(model_name, hit)
        if missing:
            try:
                adapter = version.read()
            except BaseException:
                self.release(version.key, count=count)
                raise
            with self._state:
                version.adapter = version.adapter or adapter
            self.metrics.adapter_loaded(model_name, "disk")
        return version.key

    def _needs_auto_load(self, name: str) -> bool:
        with self._state:
            known = name in self._current or name in self._reserved
        return not known and self.auto_load and bool(self.roots) and NAME_PATTERN.fullmatch(name) is not None

    def _auto_load(self, name: str) -> None:
        try:
            root, folder = allowed_folder(self.roots, name)
        except FileNotFoundError:
            raise self.not_found(name) from None
        with contextlib.suppress(Conflict):  # another request loaded it meanwhile
            self._install(name, lambda: read_allowed_adapter(root, folder, name), name)

    def on_model(self, key: str | None) -> bool:
        with self._state:
            return key is None or self.residency.versions[key].on_model

    def release(self, key: str | None, count: int = 1, running: bool = False) -> None:
        """A request that held `key` ended (`running`: it had been admitted to the batch)."""
        if key is None:
            return
        with self._state:
            version = self.residency.versions[key]
            version.holders -= count
            version.active -= count if running else 0
            if version.holders <= 0:
                self._state.notify_all()

    # -- the scheduler's side (it holds `lock`) ------------------------------------------------------
    def start(self, key: str | None) -> bool:
        """Put the version on the model if it is not (making room) and count it running; False when there is no
        room yet (every adapter on the model is running or pinned)."""
        if key is None:
            return True
        version = self.residency.versions[key]
        if not self.residency.place(version):
            return False
        with self._state:
            version.active += 1
        return True

    def tidy(self) -> None:
        self.residency.tidy()

    # -- loading, reloading and unloading ----------------------------------------------------------------
    def load_allowed(self, name: str, path: str) -> None:
        """Load the adapter folder a client named (`path`, inside an allowed folder: see `allowed_files`)."""
        root, folder = allowed_folder(self.roots, path)
        self._install(name, lambda: read_allowed_adapter(root, folder, path), path)

    def load(self, name: str, folder: Path) -> None:
        """Load the adapter in `folder` as `name` (a folder the operator named: trusted)."""
        self._install(name, lambda: read_adapter(folder), folder.name)

    def _install(self, name: str, read: Callable[[], Adapter], shown: str) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"adapter name {name!r} must be 1-64 letters, digits, '_' or '-' (starting with a letter or digit)"
            )
        with self._state:
            if name == self.base_name or name in self._current or name in self._reserved:
                raise Conflict(f"a model named {name!r} already exists; unload it first or pick another name")
            self._reserved.add(name)
        try:
            adapter = read()
            check_adapter(adapter, shown)
            version = self._new_version(name, read, adapter)
            with self.lock:
                self.residency.add(version)
            with self._state:
                self._current[name] = version
        finally:
            with self._state:
                self._reserved.discard(name)
                self._state.notify_all()
        self.metrics.adapter_loaded(name, "disk")

    def _new_version(self, name: str, read: Callable[[], Adapter], adapter: Adapter) -> Version:
        with self._state:
            serial = self._serial[name] = self._serial.get(name, 0) + 1
        key = name if serial == 1 else f"{name}@{serial}"
        return Version(name, key, read, adapter, pinned=name in self.pinned)

    def reload(self, name: str) -> None:
        """Read the adapter's folder again and serve its new weights to the requests that come next; requests in
        flight finish on the old weights, which leave once none holds them."""
        with self._state:
            old = self._current.get(name)
            if old is None or name in self._unloading:
                raise self.not_found(name)
        adapter = old.read()
        check_adapter(adapter, name)
        version = self._new_version(name, old.read, adapter)
        with self.lock:
            self.residency.add(version)
            with self._state:
                self._current[name] = version
                old.retired = True
            self.residency.tidy()
        self.metrics.adapter_loaded(name, "disk")

    def unload(self, name: str) -> None:
        """Remove an adapter once no queued or running request uses it (new requests are refused meanwhile)."""
        with self._state:
            if name not in self._current or name in self._unloading:
                raise self.not_found(name)
            self._unloading.add(name)
            deadline = time.monotonic() + self.unload_timeout
            while (held := sum(v.holders for v in self.residency.versions.values() if v.name == name)) > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._unloading.discard(name)
                    raise Conflict(
                        f"adapter {name!r} is still used by {held} requests after "
                        f"{self.unload_timeout:g} s; it stays loaded"
                    )
                self._state.wait(left)
            versions = [v for v in self.residency.versions.values() if v.name == name]
        with self.lock:
            for version in versions:
                self.residency.remove(version)
        with self._state:
            del self._current[name]
            self._unloading.discard(name)
