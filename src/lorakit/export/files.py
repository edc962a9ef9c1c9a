"""Writing a GGUF file atomically: the `gguf` package's writer on a temporary file beside the target, renamed
into place once complete, so a failed export leaves no file (or the previous one) behind."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf

from ..atomic import atomic_write


def write_gguf(path: Path, architecture: str, fill: Callable[[gguf.GGUFWriter], None]) -> None:
    """Create a GGUF file for `architecture` at `path`; `fill(writer)` adds its keys and tensors."""

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, architecture)
        try:
            fill(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
