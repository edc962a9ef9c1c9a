"""What the two serving benchmarks share (`serve.py`, `serve_manager.py`): random LoRA adapters saved to disk,
and the closed-loop client that drives a system and times its requests.

A system is anything with `submit(prompt ids, adapter name, on_done)`, called from client threads; `on_done`
runs once the request's last token is out.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapters(model, count: int, folder: Path) -> dict[str, Path]:
    """`count` random r=8 adapters saved in folder (B ≠ 0, small enough to keep the model's text sane)."""
    import lorakit

    generator = torch.Generator().manual_seed(0)
    folders = {}
    for i in range(count):
        name = f"a{i}"
        lorakit.add_adapter(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=TARGETS), name=name)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if f".{name}." in param_name or param_name.endswith(f".{name}"):
                    param.copy_(
                        torch.randn(param.shape, generator=generator) * (0.02 if "lora_B" in param_name else 0.05)
                    )
        folders[name] = lorakit.save_adapter(model, folder / name, name=name)
        lorakit.delete_adapter(model, name)
    return folders


def run_load(system, requests: list[tuple[list[int], str]], concurrency: int, progress) -> dict:
    """Closed loop: `concurrency` clients, each sending its next request when the previous one is answered."""
    pending = deque(enumerate(requests))
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                _, (ids, adapter) = pending.popleft()
            done = threading.Event()
            start = time.perf_counter()
            system.submit(ids, adapter, done.set)
            done.wait()
            with lock:
                latencies.append(time.perf_counter() - start)
                progress.update(1)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    latencies.sort()
    return {
        "seconds": round(seconds, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
    }
