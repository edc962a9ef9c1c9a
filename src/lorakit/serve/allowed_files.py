"""Reading adapter folders that clients name, without leaving the folders the operator allowed.

A client names a folder relative to an allowed folder (`--adapter-dir`), or an absolute path inside one. The
path is refused with '..' in it, and resolved (symlinks followed) before it is compared with the allowed folders:
whatever it resolves to must lie inside one. The files are then opened without following any symlink and
without a time-of-check/time-of-use gap: from a handle on the allowed folder, each folder of the resolved path
is opened relative to the previous one with `O_NOFOLLOW`, and so are the files; a symlink swapped in after the
check makes the open fail instead of leading elsewhere. Only regular files are read, whole, into memory, and
parsed from those bytes (`lorakit.io.read_adapter_contents`: bounded sizes, the safetensors header checked
before anything is allocated), never from the path again.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import LoraConfig
from ..io import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, read_adapter_contents
from ..safe_files import MAX_CONFIG_BYTES

# O_NOFOLLOW and dir_fd exist on every POSIX system; elsewhere a 0 flag would silently follow links.
_NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW


class Forbidden(PermissionError):
    """A run-time load outside the allowed folders, through a symlink, or while run-time loading is off."""


def allowed_folder(roots: list[Path], path: str) -> tuple[Path, Path]:
    """(allowed folder, resolved adapter folder inside it) for the folder a client named.

    Raises Forbidden for '..', an empty or NUL-bearing path, or a path that resolves outside every allowed
    folder; FileNotFoundError when no allowed folder has it."""
    if not roots:
        raise Forbidden("loading adapters at run time is off; start the server with --adapter-dir FOLDER")
    requested = Path(path)
    if not path or ".." in requested.parts or "\x00" in path:
        raise Forbidden(
            f"adapter path {path!r} is refused: give a folder inside the allowed adapter folders, without '..'"
        )
    candidates = [requested] if requested.is_absolute() else [root / requested for root in roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        root = next((r for r in roots if resolved.is_relative_to(r)), None)
        if root is None:
            raise Forbidden(f"adapter path {path!r} leads outside the allowed adapter folders")
        if resolved.is_dir():
            return root, resolved
    raise FileNotFoundError(f"no adapter folder {path!r} inside the allowed adapter folders")


@contextmanager
def _folder_handle(root: Path, folder: Path, shown: str) -> Iterator[int]:
    """A handle on `folder` (inside `root`), opened folder by folder from `root` without following symlinks."""
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        for part in folder.relative_to(root).parts:
            try:
                inner = os.open(part, _DIRECTORY, dir_fd=fd)
            except OSError as err:
                raise _refusal(err, shown) from None
            os.close(fd)
            fd = inner
        yield fd
    finally:
        os.close(fd)


def _refusal(err: OSError, shown: str) -> OSError:
    if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):  # a symlink where a folder or file was checked
        return Forbidden(f"adapter path {shown!r} changed or holds a symbolic link; it is not read")
    if err.errno == errno.ENOENT:
        return FileNotFoundError(f"no adapter folder {shown!r} inside the allowed adapter folders")
    return Forbidden(f"adapter path {shown!r} cannot be read: {os.strerror(err.errno or 0)}")


def read_files(root: Path, folder: Path, limits: dict[str, int | None], shown: str) -> dict[str, bytes]:
    """The contents of the files of `folder` named in `limits` (name → largest size, or None) that exist (missing
    ones are left out), read without following symlinks (a symlinked file or folder: Forbidden). `shown` names
    the folder in messages."""
    contents: dict[str, bytes] = {}
    with _folder_handle(root, folder, shown) as folder_fd:
        for name, limit in limits.items():
            try:
                # O_NONBLOCK: opening a FIFO planted as the file must not wait for a writer
                fd = os.open(name, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), dir_fd=folder_fd)
            except FileNotFoundError:
                continue
            except OSError as err:
                raise Forbidden(f"{shown}/{name} is a symbolic link or cannot be read; it is not read") from err
            with os.fdopen(fd, "rb") as file:
                status = os.fstat(file.fileno())
                if not stat.S_ISREG(status.st_mode):
                    raise Forbidden(f"{shown}/{name} is not a regular file; it is not read")
                if limit is not None and status.st_size > limit:
                    raise AdapterFileError(f"{shown}/{name} is larger than {limit} bytes; it is not read")
                contents[name] = file.read()
    return contents


def read_allowed_adapter(root: Path, folder: Path, shown: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The adapter in `folder` (inside the allowed folder `root`), read as described in the module docstring."""
    files = read_files(root, folder, {CONFIG_NAME: MAX_CONFIG_BYTES, WEIGHTS_NAME: None}, shown)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if name not in files:
            raise AdapterFileError(f"adapter folder {shown!r} has no {name}")
    return read_adapter_contents(files[CONFIG_NAME], files[WEIGHTS_NAME], shown)
