"""What a method costs besides accuracy: the size of its file, the memory training holds, and the time
of an inference forward pass."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import threading
import time
from pathlib import Path

import psutil
import torch
from torch import nn

from ..device import model_device, synchronize, to_device


def weights_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the safetensors files directly in `folder` (an adapter's or a method's weights)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def release_free_memory() -> None:
    """Hand the heap memory the C allocator keeps after frees back to the system (glibc's malloc_trim; a no-op
    elsewhere), so that the resident size counts live memory only."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class PeakRss:
    """`with PeakRss() as peak: ...` records this process's largest resident set size (MB) while the block
    runs, sampled by a thread every `interval` seconds (the kernel's ru_maxrss is the peak of the process's
    whole life, which loading the model may already have set). Freed memory is returned to the system first:
    memory that earlier work freed but the allocator kept would otherwise be reused unseen."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def _rss_mb() -> float:
        return psutil.Process().memory_info().rss / 2**20

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self) -> PeakRss:
        release_free_memory()
        self.start_mb = self.peak_mb = self._rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())


@torch.no_grad()
def forward_latency_ms(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time (ms) of one forward pass on `batch` in evaluation mode (labels left out), on the model's
    device (timed after the device has finished)."""
    device = model_device(model)
    inputs = to_device({k: v for k, v in batch.items() if k != "labels"}, device)
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(**inputs)
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            model(**inputs)
            synchronize(device)
            times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return 1000 * statistics.median(times)
