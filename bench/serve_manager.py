"""The adapter manager of `lorakit serve` under load: a tiny random llama with `--many-adapters` (256) r=8 adapters,
`--requests` requests drawn from a Zipf popularity over them (exponent `--zipf`), run with every adapter on the
model, with `--max-loaded` (16) on the model and the rest in host memory, and with 16 on the model, 64 in host
memory and the rest read from disk on use. Reported per setup: tokens/s, p50 / p99 latency, hit rate, loads,
evictions and the seconds requests waited for loads (JSON in bench/results/serve_manager.json).

    ../shared/tools/quiet .venv/bin/python bench/serve_manager.py --requests 512 --tokens 16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common import load_average
from serve_load import make_adapters, run_load

RESULTS = Path(__file__).parent / "results" / "serve_manager.json"


def tiny_llama() -> torch.nn.Module:
    """A random 4-layer, hidden-64 llama (vocabulary 512): the model is small, so the adapters' loads and
    evictions are a large part of the work."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


class Managed:
    """The server's scheduler and engine in process, with at most `max_loaded` adapters on the model (the least
    recently used idle one moves to host memory) and `max_host` in host memory (more: read from disk again)."""

    def __init__(self, folders: dict[str, Path], args, max_loaded: int | None, max_host: int | None) -> None:
        from lorakit.serve.engine import Engine
        from lorakit.serve.metrics import Metrics
        from lorakit.serve.registry import Registry
        from lorakit.serve.scheduler import Scheduler

        self.metrics = Metrics()
        model = tiny_llama()
        self.registry = Registry(model, "tiny", metrics=self.metrics, max_loaded=max_loaded, max_host=max_host)
        for name, folder in folders.items():
            self.registry.load(name, folder)
        engine = Engine(model, None, 0, args.batch_size)
        self.scheduler = Scheduler(engine, self.registry, self.metrics, max_queue=10_000, wait=args.wait_ms / 1000)
        self.tokens = args.tokens
        self.scheduler.start()

    def submit(self, ids: list[int], adapter: str, on_done: Callable[[], None]) -> None:
        from lorakit.serve.engine import Sampling, Sequence
        from lorakit.serve.scheduler import Request

        key = self.registry.acquire(adapter)  # reads the adapter from disk if its host copy was dropped
        sequence = Sequence(ids, key, Sampling(self.tokens, ignore_eos=True))
        emit = lambda event: event[0] != "token" and on_done()  # noqa: E731
        self.scheduler.submit(Request(sequence, adapter, emit, cold=not self.registry.on_model(key)))

    def counters(self) -> dict[str, float]:
        """Loads, evictions, hit rate and seconds waited for loads, summed over the adapters (from /metrics)."""
        sums: dict[str, float] = {}
        for line in self.metrics.render({}, {}, []).splitlines():
            if line.startswith("lorakit_adapter"):
                name, value = line.rsplit(" ", 1)
                family = name.split("{")[0].removeprefix("lorakit_adapter_").removesuffix("_total")
                label = name.split(",")[-1].rstrip("}").replace('"', "") if "," in name else ""
                key = f"{family}_{label.split('=')[1]}" if label else family
                sums[key] = round(sums.get(key, 0.0) + float(value), 3)
        return sums

    def close(self) -> None:
        self.scheduler.stop()


def run_manager(args) -> None:
    """256 adapters, requests for them drawn from a Zipf popularity: all on the model, or 16 with the rest in
    host memory, or 16 on the model, 64 in host memory and the rest read from disk on use."""
    from lorakit.atomic import atomic_write

    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    names = [f"a{k}" for k in range(args.many_adapters)]
    popularity = [1 / (k + 1) ** args.zipf for k in range(len(names))]
    requests = [
        ([rng.randrange(3, 512) for _ in range(32)], name) for name in rng.choices(names, popularity, k=args.requests)
    ]
    setups = [("all on the model", None, None), (f"{args.max_loaded} on the model", args.max_loaded, None)]
    setups.append(
        (f"{args.max_loaded} on the model, {4 * args.max_loaded} in host memory", args.max_loaded, 4 * args.max_loaded)
    )
    rows = []
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(tiny_llama(), len(names), Path(tmp))
        for label, max_loaded, max_host in setups:
            system = Managed(folders, args, max_loaded, max_host)
            run_load(system, requests[:32], args.concurrency, tqdm(disable=True))  # warm-up
            before = system.counters()
            with tqdm(total=len(requests), desc=label, unit="req", file=sys.stderr) as bar:
                result = run_load(system, requests, args.concurrency, bar)
            after = system.counters()
            system.close()
            counts = {k: round(v - before.get(k, 0.0), 3) for k, v in after.items() if k != "hit_rate"}
            asked = counts.get("requests_true", 0) + counts.get("requests_false", 0)
            counts["hit_rate"] = round(counts.get("requests_true", 0) / asked, 3) if asked else 1.0
            rows.append(
                {
                    "setup": label,
                    "max_loaded_adapters": max_loaded,
                    "max_cpu_adapters": max_host,
                    **result,
                    "tokens_per_s": round(len(requests) * args.tokens / result["seconds"], 1),
                    **counts,
                    "load_average": load_average()[0],
                }
            )
    report = {
        "model": "random llama: 4 layers, hidden 64, vocabulary 512",
        "adapters": f"{len(names)} x r=8, alpha=16 on q,k,v,o, random A and B",
        "popularity": f"Zipf, exponent {args.zipf}",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "results": rows,
    }
    output = args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    print(f"\n{args.requests} requests x {args.tokens} tokens over {len(names)} adapters (Zipf {args.zipf})")
    print(f"{'setup':<40}{'tokens/s':>10}{'p50 s':>8}{'p99 s':>8}{'loads':>7}{'evictions':>10}")
    for r in rows:
        print(
            f"{r['setup']:<40}{r['tokens_per_s']:>10}{r['p50_s']:>8}{r['p99_s']:>8}"
            f"{r.get('loads_host', 0):>7g}{r.get('evictions_host', 0):>10g}"
        )
    print(f"written to {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per request")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--wait-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--many-adapters", type=int, default=256)
    parser.add_argument("--max-loaded", type=int, default=16, help="adapters on the model at once")
    parser.add_argument("--zipf", type=float, default=1.0, help="exponent of the adapters' Zipf popularity")
    parser.add_argument("--output", type=Path, default=RESULTS)
    run_manager(parser.parse_args())


if __name__ == "__main__":
    main()
