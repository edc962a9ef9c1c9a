"""Files and folders that appear whole or not at all, with the mode a plain `open()` would give them.

- `atomic_write(target, write)`: one file, written beside its target, fsynced, renamed over it.
- `write_folder(target, fill)`: a folder built in a temporary sibling, every file and folder fsynced, then put
  in place. A new target is one rename. An existing target is swapped with the new folder in one step
  (Linux `renameat2(RENAME_EXCHANGE)`): readers see the old folder or the new one, never a mix. Where the
  swap is not available, the old folder is renamed aside first: a reader may then find no folder for an
  instant, but never a mix; a crash in between leaves the old folder whole in `.NAME.old-*` beside it.
- `write_files(folder, writers)`: a set of files (an adapter's config and weights) written as a unit into
  a folder. A folder holding only those files (or not there yet) is replaced whole by `write_folder`. A
  folder that also holds other things (a training run's output) cannot be swapped, so each file is first
  written and fsynced as `.NAME.pending`, then the pending files are renamed in order; a crash between the
  renames is finished by `committed_files` for lorakit's readers (and by the next `write_files`), so they
  read the new set whole. Other tools reading such a folder right after a crash may see a mix.

Every file written gets mode 0666 & ~umask (safetensors and mkstemp make private 0600 files; a server or a
colleague under another account must be able to read an adapter).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

PENDING_SUFFIX = ".pending"
_RENAME_EXCHANGE = 2  # from <linux/fs.h>
_AT_FDCWD = -100


def open_mode(folder: bool = False) -> int:
    """The mode `open()` (or `mkdir`) gives a new file (folder) under the current umask."""
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `target`, then rename it into place: readers
    see the old file or the new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, open_mode())  # after writing: safetensors replaces the file with a private one
        _fsync(Path(tmp))
        os.replace(tmp, target)
        _fsync(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_folder(target: Path, fill: Callable[[Path], object]) -> Path:
    """Call `fill(tmp)` on an empty temporary folder beside `target`, then put it in place whole (see the
    module docstring for what readers can see). `target` may exist; its content is replaced (a link to a
    folder stays a link: the folder it names is replaced)."""
    real = Path(os.path.realpath(target)) if target.is_symlink() else target
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-", dir=real.parent))
    try:
        fill(tmp)
        _publish_tree(tmp)
        install_folder(tmp, real)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap, `tmp` holds the old folder
    return target


def install_folder(new: Path, target: Path) -> None:
    """Move the complete folder `new` to `target`, swapping it with an existing `target` in one step where the
    system allows; `new` then holds the old folder (the caller removes it)."""
    if not target.exists():
        try:
            os.rename(new, target)
            _fsync(target.parent)
            return
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise  # anything but "someone created it meanwhile"
    if _exchange(new, target):
        _fsync(target.parent)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, aside)  # `aside` is empty: a folder may replace an empty folder
    os.rename(new, target)
    _fsync(target.parent)
    os.rename(aside, new)


def write_files(folder: Path, writers: Mapping[str, Callable[[str], object]]) -> Path:
    """Write the files `name → write(tmp_path)` into `folder` as one unit (see the module docstring); the
    renames follow the mapping's order, so put first the file whose change matters most (the weights)."""
    names = list(writers)
    finish_pending(folder, names)
    if not folder.exists() or {p.name for p in folder.iterdir()} <= set(names):
        return write_folder(folder, lambda tmp: _write_all(tmp, writers))
    pending = {name: _pending(folder, name) for name in names}
    try:
        for name, write in writers.items():
            write(str(pending[name]))
            os.chmod(pending[name], open_mode())
            _fsync(pending[name])
        _fsync(folder)
    except BaseException:
        for path in pending.values():
            path.unlink(missing_ok=True)
        raise
    for name, path in pending.items():
        os.replace(path, folder / name)
    _fsync(folder)
    return folder


def committed_files(folder: Path, names: list[str]) -> dict[str, Path]:
    """Where a reader finds each of `names` (written by `write_files` in this order): the file itself, or its
    pending copy when a writer stopped between the renames."""
    started = _renames_started(folder, names)
    return {
        name: _pending(folder, name) if started and _pending(folder, name).exists() else folder / name for name in names
    }


def finish_pending(folder: Path, names: list[str]) -> None:
    """Complete the renames of a `write_files` of `names` that stopped between them, or drop the pending files
    of one that stopped before them (the folder then still holds the previous set, whole)."""
    if not folder.is_dir():
        return
    started = _renames_started(folder, names)
    for name in names:
        pending = _pending(folder, name)
        if pending.exists():
            if started:
                os.replace(pending, folder / name)
            else:
                pending.unlink()
    _fsync(folder)


def _renames_started(folder: Path, names: list[str]) -> bool:
    """The renames start once every pending file is written and fsynced, with the first name: its pending file
    gone while a later one remains means they started and did not finish."""
    return not _pending(folder, names[0]).exists() and any(_pending(folder, n).exists() for n in names[1:])


def _pending(folder: Path, name: str) -> Path:
    return folder / f".{name}{PENDING_SUFFIX}"


def _write_all(folder: Path, writers: Mapping[str, Callable[[str], object]]) -> None:
    for name, write in writers.items():
        write(str(folder / name))


def _publish_tree(root: Path) -> None:
    """Give every file and folder under `root` (included) the usual modes and flush it all to disk."""
    file_mode, folder_mode = open_mode(), open_mode(folder=True)
    for current, folders, files in os.walk(root):
        for name in files:
            path = Path(current) / name
            if not path.is_symlink():
                os.chmod(path, file_mode)
                _fsync(path)
        for name in folders:
            os.chmod(Path(current) / name, folder_mode)
        os.chmod(current, folder_mode)
        _fsync(Path(current))


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["atomic_write", "committed_files", "install_folder", "open_mode", "write_files", "write_folder"]
