"""The layout of LoRA's r-wide backward products: as autograd's matmul writes them, against
`lorakit.layers.lora_function.narrow_product`, which writes r long rows instead of M short ones.

The products are those of a LoRA training step on SmolLM2-135M (hidden 576, k/v width 192) at batch 4 × 128
and 4 × 512 (M = 512, 2048 token rows): grad·B (M × K times K × r: the gradient of the r-wide product) and
B's gradient gradᵀ·down (K × M times M × r), for r = 8 (every adapter's up-projection, grouped or not, is r
wide), each operand laid out as in a training step. Both layouts take turns, one call each per round;
the median is reported.

    .venv/bin/python bench/narrow_product.py         # table + bench/results/narrow_product.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lorakit.layers.lora_function import narrow_product

from common import machine

RESULTS = Path(__file__).parent / "results" / "narrow_product.json"
ROWS = (512, 2048)  # batch 4 × 128 and 4 × 512
SHAPES = ((576, 8), (192, 8))  # (K, r): q/o width, k/v width


def products(rows: int, width: int, rank: int, dtype: torch.dtype) -> dict[str, tuple[Callable, Callable]]:
    """(as autograd's matmul writes it, as lorakit's backward pass does) for both products, on random operands:
    B (K × r, K = the output width) as stored, down (M × r) as the forward pass leaves it."""
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(rows, width, generator=generator).to(dtype)
    b = torch.randn(width, rank, generator=generator).to(dtype)
    down = torch.randn(rows, rank, generator=generator).to(dtype)
    return {
        "grad·B": (lambda: grad @ b, lambda: narrow_product(grad, b.t().contiguous())),
        "gradᵀ·down": (lambda: grad.t() @ down, lambda: narrow_product(grad.t(), down.t())),
    }


def median_us(written: Callable, narrow: Callable, rounds: int) -> tuple[float, float]:
    """Median microseconds per call of both layouts, taking turns."""
    times: tuple[list[float], list[float]] = ([], [])
    for call in (written, narrow, written, narrow):
        call()  # warm-up
    for _ in range(rounds):
        for call, seen in zip((written, narrow), times):
            began = time.perf_counter()
            call()
            seen.append(time.perf_counter() - began)
    return 1e6 * statistics.median(times[0]), 1e6 * statistics.median(times[1])


def measure(rounds: int) -> list[dict]:
    rows_out = []
    for dtype in (torch.float32, torch.bfloat16):
        for rows in ROWS:
            for width, rank in SHAPES:
                for kind, (written, narrow) in products(rows, width, rank, dtype).items():
                    as_written, transposed = median_us(written, narrow, rounds)
                    row = dict(dtype=str(dtype).removeprefix("torch."), rows=rows, width=width, rank=rank, kind=kind)
                    rows_out.append(row | {"as_written_us": as_written, "narrow_product_us": transposed})
                    print(_line(rows_out[-1]), flush=True)
    return rows_out


def _line(row: dict) -> str:
    speedup = row["as_written_us"] / row["narrow_product_us"]
    return (
        f"| {row['dtype']} | {row['rows']} × {row['width']} | {row['rank']} | {row['kind']} | "
        f"{row['as_written_us']:.0f} | {row['narrow_product_us']:.0f} | {speedup:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    print("| dtype | M × K | r | product | as written µs | narrow_product µs | × faster |")
    print("|---|---|---|---|---|---|---|")
    results = {"machine": machine(), "rounds": args.rounds, "rows": measure(args.rounds)}
    results["load_after"] = machine()["load_average"]
    info = results["machine"]
    flags = " ".join(info["cpu_flags"])
    print(f"\n{info['cpu']}; flags {flags}; torch {info['torch']}, {info['torch_threads']} threads")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
