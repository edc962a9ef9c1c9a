"""Reading files that may be hostile: bounded sizes, safetensors headers checked against the file before any
tensor is allocated, and weights that must be finite.

Every lorakit reader of tensors or configs (adapter folders, method folders, checkpoints, quantized bases) goes
through here, so a truncated, oversized, malformed or NaN-filled file is refused with one `UnsafeFileError`
line that names the file, and nothing is loaded. The safetensors layout is parsed by hand (8-byte
little-endian header length, then a JSON header): the header size is bounded, every dtype must be known,
and every tensor's declared shape must match its byte range, the ranges must tile the data exactly, and the
data must end where the file ends — so a header declaring a 1 TB tensor is refused after reading a few bytes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

MAX_HEADER_BYTES = 16 * 2**20  # a header lists names, dtypes, shapes: ~100 bytes a tensor
MAX_CONFIG_BYTES = 2**20  # JSON / YAML configs are kilobytes; PyYAML parses about 0.1 MB a second
FINITE_CHECK_CHUNK = 2**22  # elements checked at once: bounds the check's temporary memory
# safetensors' dtype names and their torch dtypes (sub-byte float formats are refused).
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}
FLOAT_DTYPES = frozenset({"F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64"})


class UnsafeFileError(ValueError):
    """A file that is damaged, oversized or hostile; the message names it."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors' name, e.g. "F32"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsLayout:
    """What a safetensors header declares, already checked against the file's size."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_bounded(path: Path, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of `path`, refused (before reading) when over `limit`."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise UnsafeFileError(f"{path} is {size} bytes, over the {limit}-byte limit for this file")
            return handle.read(limit + 1)[:limit]
    except OSError as err:
        raise UnsafeFileError(f"{path} cannot be read: {err.strerror or err}") from None


def parse_json(data: bytes, where: str | os.PathLike, limit: int = MAX_CONFIG_BYTES) -> Any:
    """A JSON document of at most `limit` bytes (deep nesting and bad UTF-8 are refused too)."""
    if len(data) > limit:
        raise UnsafeFileError(f"{where} is {len(data)} bytes, over the {limit}-byte limit for this file")
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UnsafeFileError(f"{where} is not valid JSON: {str(err).splitlines()[0] if str(err) else err!r}") from None


def parse_layout(head: bytes, file_size: int, where: str | os.PathLike) -> SafetensorsLayout:
    """Check a safetensors header (`head` starts with the file's first bytes, at least the 8-byte length and
    the header it announces) against a file of `file_size` bytes."""
    if file_size < 8 or len(head) < 8:
        raise UnsafeFileError(f"{where} is not a safetensors file: {file_size} bytes, shorter than its header")
    header_size = int.from_bytes(head[:8], "little")
    if header_size > MAX_HEADER_BYTES:
        raise UnsafeFileError(f"{where}: safetensors header of {header_size} bytes, over the {MAX_HEADER_BYTES} limit")
    if 8 + header_size > file_size or len(head) < 8 + header_size:
        raise UnsafeFileError(f"{where} is truncated: its header announces {header_size} bytes the file lacks")
    header = parse_json(head[8 : 8 + header_size], where, MAX_HEADER_BYTES)
    if not isinstance(header, dict):
        raise UnsafeFileError(f"{where}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UnsafeFileError(f"{where}: the safetensors metadata must map names to strings")
    tensors: dict[str, TensorEntry] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        dtype, shape, begin, end = _entry(name, entry, where)
        tensors[name] = TensorEntry(dtype, shape)
        ranges.append((begin, end, name))
    _check_tiling(sorted(ranges), file_size - 8 - header_size, where)
    return SafetensorsLayout(tensors, metadata)


def _entry(name: str, entry: Any, where: str | os.PathLike) -> tuple[str, tuple[int, ...], int, int]:
    """One header entry's dtype, shape and byte range, checked for consistency."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise UnsafeFileError(f"{where}: malformed header entry for {name!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise UnsafeFileError(f"{where}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise UnsafeFileError(f"{where}: tensor {name!r} has a malformed shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise UnsafeFileError(f"{where}: tensor {name!r} has malformed data offsets {offsets!r}")
    declared = math.prod(shape) * DTYPES[dtype].itemsize
    if declared != offsets[1] - offsets[0]:
        raise UnsafeFileError(
            f"{where}: tensor {name!r} declares shape {shape} of {dtype} ({declared} bytes) "
            f"but a byte range of {offsets[1] - offsets[0]}"
        )
    return dtype, tuple(shape), offsets[0], offsets[1]


def _check_tiling(ranges: list[tuple[int, int, str]], data_size: int, where: str | os.PathLike) -> None:
    """The tensors' byte ranges follow each other without gap or overlap and end where the file ends."""
    position = 0
    for begin, end, name in ranges:
        if begin != position:
            raise UnsafeFileError(f"{where}: tensor {name!r} starts at byte {begin}, expected {position}")
        position = end
    if position != data_size:
        raise UnsafeFileError(
            f"{where} does not fit its header: the tensors need {position} bytes of data, the file holds {data_size}"
        )


def layout_of_file(path: Path) -> SafetensorsLayout:
    """The checked layout of a safetensors file, reading only its header."""
    try:
        with open(path, "rb") as handle:
            return _layout_of_handle(handle, os.fstat(handle.fileno()).st_size, path)
    except OSError as err:
        raise UnsafeFileError(f"{path} cannot be read: {err.strerror or err}") from None


def _layout_of_handle(handle: BinaryIO, size: int, where: Path) -> SafetensorsLayout:
    head = handle.read(8)
    if len(head) == 8:
        announced = int.from_bytes(head, "little")
        if announced <= MAX_HEADER_BYTES and 8 + announced <= size:
            head += handle.read(announced)
    return parse_layout(head, size, where)


def read_safetensors(
    source: Path | bytes, where: str | os.PathLike, allowed_dtypes: frozenset[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file (a path, or its bytes). Its header is checked first
    (`parse_layout`, and every dtype in `allowed_dtypes` when given), before any tensor is allocated; then
    floating-point tensors must be finite."""
    if isinstance(source, bytes):
        layout = parse_layout(source[: 8 + MAX_HEADER_BYTES], len(source), where)
    else:
        layout = layout_of_file(source)
    for name, entry in layout.tensors.items():
        if allowed_dtypes is not None and entry.dtype not in allowed_dtypes:
            expected = ", ".join(sorted(allowed_dtypes))
            raise UnsafeFileError(f"{where}: tensor {name!r} is {entry.dtype}, expected one of {expected}")
    try:
        tensors = load_safetensors_bytes(source) if isinstance(source, bytes) else load_file(source)
    except Exception as err:  # safetensors' own errors have several types; the header passed our checks
        raise UnsafeFileError(f"{where} is not a readable safetensors file: {err}") from None
    check_finite(tensors, where)
    return tensors, layout.metadata


def check_finite(tensors: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """Refuse NaN or infinite values in any floating-point tensor (checked in chunks to bound memory)."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), FINITE_CHECK_CHUNK):
            if not bool(torch.isfinite(flat[start : start + FINITE_CHECK_CHUNK]).all()):
                raise UnsafeFileError(f"{where}: tensor {name!r} holds NaN or infinite values")


__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_HEADER_BYTES",
    "SafetensorsLayout",
    "UnsafeFileError",
    "DTYPES",
    "FLOAT_DTYPES",
    "check_finite",
    "layout_of_file",
    "parse_json",
    "parse_layout",
    "read_bounded",
    "read_safetensors",
]
