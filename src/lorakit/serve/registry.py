"""The adapters a server runs: which are loaded, where run-time loads may read from, and which are in use.

Adapters named at start-up come from the operator's command line. Adapters loaded at run time (the admin API)
come only from inside the folders the operator allowed (`--adapter-dir`): a request names a folder relative to
one of them (or an absolute path inside one); '..' and anything that resolves outside them, symlinks included,
is refused. A request holds its adapter from the moment it is queued until it finishes, and unloading an adapter
waits until nothing holds it (new requests for it are refused meanwhile). Every change to the model happens
under `lock`, which the scheduler also holds for each forward pass.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from pathlib import Path

from torch import nn

from ..inject import delete_adapter
from ..io import load_adapter, read_adapter

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class ModelNotFound(KeyError):
    """A request names a model (adapter) the server does not have."""


class Forbidden(PermissionError):
    """A run-time load outside the allowed folders, or while run-time loading is off."""


class Conflict(RuntimeError):
    """A name that is taken, or an unload that could not finish."""


class Registry:
    def __init__(
        self, model: nn.Module, base_name: str, adapter_dirs: list[Path] | tuple = (), unload_timeout: float = 600.0
    ) -> None:
        self.model = model
        self.base_name = base_name
        self.roots = [Path(d).expanduser().resolve() for d in adapter_dirs]
        for root in self.roots:
            if not root.is_dir():
                raise FileNotFoundError(f"adapter folder {root} does not exist")
        self.unload_timeout = unload_timeout
        self.lock = threading.RLock()  # the model: loads, unloads and forward passes
        self._state = threading.Condition()  # the bookkeeping below
        self._loaded: dict[str, Path] = {}
        self._unloading: set[str] = set()
        self._in_use: Counter[str] = Counter()

    # -- what exists ------------------------------------------------------------------------------
    def adapters(self) -> list[str]:
        with self._state:
            return [n for n in self._loaded if n not in self._unloading]

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters()]

    def in_use(self) -> dict[str, int]:
        with self._state:
            return {n: self._in_use[n] for n in self._loaded}

    def not_found(self, name: str) -> ModelNotFound:
        return ModelNotFound(f"model {name!r} does not exist; available models: {', '.join(self.model_names())}")

    # -- requests ---------------------------------------------------------------------------------
    def acquire(self, model_name: str) -> str | None:
        """The adapter a request's `model` field selects (None: the base model), held until `release`."""
        if model_name == self.base_name:
            return None
        with self._state:
            if model_name not in self._loaded or model_name in self._unloading:
                raise self.not_found(model_name)
            self._in_use[model_name] += 1
            return model_name

    def release(self, adapter: str | None) -> None:
        if adapter is None:
            return
        with self._state:
            self._in_use[adapter] -= 1
            if self._in_use[adapter] <= 0:
                del self._in_use[adapter]
                self._state.notify_all()

    # -- loading and unloading ----------------------------------------------------------------------
    def allowed_folder(self, path: str) -> Path:
        """The adapter folder a run-time load request may read, resolved inside an allowed folder."""
        if not self.roots:
            raise Forbidden("loading adapters at run time is off; start the server with --adapter-dir FOLDER")
        requested = Path(path)
        if not path or ".." in requested.parts or "\x00" in path:
            raise Forbidden(
                f"adapter path {path!r} is refused: give a folder inside the allowed adapter folders, without '..'"
            )
        candidates = [requested] if requested.is_absolute() else [root / requested for root in self.roots]
        for candidate in candidates:
            resolved = candidate.resolve()
            if not any(resolved.is_relative_to(root) for root in self.roots):
                raise Forbidden(f"adapter path {path!r} leads outside the allowed adapter folders")
            if resolved.is_dir():
                return resolved
        raise FileNotFoundError(f"no adapter folder {path!r} inside the allowed adapter folders")

    def load(self, name: str, folder: Path) -> None:
        """Load the adapter in `folder` as `name` (the folder is trusted: see `allowed_folder`)."""
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"adapter name {name!r} must be 1-64 letters, digits, '_' or '-' (starting with a letter or digit)"
            )
        config, _ = read_adapter(folder)
        if config.modules_to_save or config.bias != "none":
            raise ValueError(
                f"adapter at {folder.name!r} trains modules_to_save or biases, which every request "
                "would share; the server runs adapters that only add low-rank matrices"
            )
        if config.task_type not in (None, "CAUSAL_LM"):
            raise ValueError(f"adapter at {folder.name!r} is for task {config.task_type}, not a causal LM")
        with self._state:
            if name == self.base_name or name in self._loaded:
                raise Conflict(f"a model named {name!r} already exists; unload it first or pick another name")
            self._loaded[name] = folder
            self._unloading.add(name)  # not usable before it is in the model
        try:
            with self.lock:
                load_adapter(self.model, folder, name=name, activate=False)
        except BaseException:
            with self._state:
                del self._loaded[name]
                self._unloading.discard(name)
            raise
        with self._state:
            self._unloading.discard(name)

    def unload(self, name: str) -> None:
        """Remove an adapter once no queued or running request uses it (new requests are refused meanwhile)."""
        with self._state:
            if name not in self._loaded or name in self._unloading:
                raise self.not_found(name)
            self._unloading.add(name)
            deadline = time.monotonic() + self.unload_timeout
            while self._in_use[name] > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._unloading.discard(name)
                    raise Conflict(
                        f"adapter {name!r} is still used by {self._in_use[name]} requests after "
                        f"{self.unload_timeout:g} s; it stays loaded"
                    )
                self._state.wait(left)
        with self.lock:
            delete_adapter(self.model, name)
        with self._state:
            del self._loaded[name]
            self._unloading.discard(name)
            self._in_use.pop(name, None)
