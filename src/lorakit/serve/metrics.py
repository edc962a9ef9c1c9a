"""Server metrics in the Prometheus text format (`GET /metrics`), per model (the base model or an adapter).

Counters: finished requests by outcome, requests refused before queueing by HTTP status, prompt and generated
tokens, request seconds. Gauges: generated tokens per second over the last `window` seconds, and the queue
depth and running sequences that the scheduler reports at the time of the scrape.

Per adapter: loads (`source="disk"`: its files read; `source="host"`: put on the model from its host copy),
evictions (`to="host"`: taken off the model; `to="disk"`: its host copy dropped), requests that found it on
the model or not (the hit rate, also as one gauge over all adapters), and the seconds such misses waited from
queueing to admission (their adapter's load included); and how many adapters are on the model, in host memory
only, and on disk only.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = defaultdict(int)
        self._rejected: dict[int, int] = defaultdict(int)
        self._prompt_tokens: dict[str, int] = defaultdict(int)
        self._generated_tokens: dict[str, int] = defaultdict(int)
        self._seconds: dict[str, float] = defaultdict(float)
        self._recent: deque[tuple[float, str, int]] = deque()  # (time, model, tokens) within the window
        self._adapter_loads: dict[tuple[str, str], int] = defaultdict(int)  # (adapter, source)
        self._adapter_evictions: dict[tuple[str, str], int] = defaultdict(int)  # (adapter, to)
        self._adapter_requests: dict[tuple[str, bool], int] = defaultdict(int)  # (adapter, on the model)
        self._adapter_wait: dict[str, float] = defaultdict(float)

    def tokens(self, model: str, count: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._generated_tokens[model] += count
            self._recent.append((now, model, count))
            self._forget(now)

    def finished(self, model: str, outcome: str, prompt_tokens: int, seconds: float) -> None:
        with self._lock:
            self._requests[(model, outcome)] += 1
            self._prompt_tokens[model] += prompt_tokens
            self._seconds[model] += seconds

    def rejected(self, status: int) -> None:
        with self._lock:
            self._rejected[status] += 1

    def adapter_loaded(self, adapter: str, source: str) -> None:
        with self._lock:
            self._adapter_loads[(adapter, source)] += 1

    def adapter_evicted(self, adapter: str, to: str) -> None:
        with self._lock:
            self._adapter_evictions[(adapter, to)] += 1

    def adapter_requested(self, adapter: str, on_model: bool) -> None:
        with self._lock:
            self._adapter_requests[(adapter, on_model)] += 1

    def adapter_waited(self, adapter: str, seconds: float) -> None:
        with self._lock:
            self._adapter_wait[adapter] += seconds

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()

    def render(
        self, queued: dict[str, int], running: dict[str, int], models: list[str], tiers: dict[str, int] | None = None
    ) -> str:
        """The exposition text; `queued` and `running` count sequences per model now, `tiers` adapters per tier."""
        now = time.monotonic()
        with self._lock:
            self._forget(now)
            rate: dict[str, float] = defaultdict(float)
            for _, model, count in self._recent:
                rate[model] += count / self.window
            lines: list[str] = []

            def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

            def per_model(values: Mapping[str, float], names: Iterable[str] = ()) -> list[tuple[str, float]]:
                return [(f'{{model="{_label(m)}"}}', values.get(m, 0)) for m in sorted(set(names) | set(values))]

            family(
                "lorakit_requests_total",
                "counter",
                "Finished requests by model and outcome.",
                [(f'{{model="{_label(m)}",outcome="{o}"}}', n) for (m, o), n in sorted(self._requests.items())],
            )
            family(
                "lorakit_rejected_requests_total",
                "counter",
                "Requests refused before queueing, by HTTP status.",
                [(f'{{status="{s}"}}', n) for s, n in sorted(self._rejected.items())],
            )
            family(
                "lorakit_prompt_tokens_total",
                "counter",
                "Prompt tokens of finished requests.",
                per_model(self._prompt_tokens),
            )
            family("lorakit_generated_tokens_total", "counter", "Generated tokens.", per_model(self._generated_tokens))
            family(
                "lorakit_request_seconds_total",
                "counter",
                "Seconds from queueing to the end, summed over "
                "finished requests (divide by lorakit_requests_total for the mean).",
                per_model(self._seconds),
            )
            family(
                "lorakit_generated_tokens_per_second",
                "gauge",
                f"Generated tokens per second over the last {self.window:g} s.",
                per_model(rate, models),
            )
            family("lorakit_queue_depth", "gauge", "Requests waiting for a batch slot.", per_model(queued, models))
            family("lorakit_running_sequences", "gauge", "Sequences in the running batch.", per_model(running, models))
            self._adapter_families(family, tiers or {})
        return "\n".join(lines) + "\n"

    def _adapter_families(self, family: Callable[[str, str, str, list[tuple[str, float]]], None], tiers: dict) -> None:
        def labelled(values: Mapping[tuple[str, Any], float], label: str) -> list[tuple[str, float]]:
            return [
                (f'{{adapter="{_label(a)}",{label}="{str(v).lower()}"}}', n) for (a, v), n in sorted(values.items())
            ]

        family(
            "lorakit_adapter_loads_total",
            "counter",
            "Adapter loads by source.",
            labelled(self._adapter_loads, "source"),
        )
        family(
            "lorakit_adapter_evictions_total",
            "counter",
            "Adapters taken off the model (to host memory) or out of host memory (to disk).",
            labelled(self._adapter_evictions, "to"),
        )
        family(
            "lorakit_adapter_requests_total",
            "counter",
            "Requests by adapter and whether it was on the model when they came.",
            labelled(self._adapter_requests, "on_model"),
        )
        hits = sum(n for (_, on_model), n in self._adapter_requests.items() if on_model)
        total = sum(self._adapter_requests.values())
        family(
            "lorakit_adapter_hit_rate",
            "gauge",
            "Share of adapter requests that found it on the model.",
            [("", hits / total if total else 1.0)],
        )
        family(
            "lorakit_adapter_load_wait_seconds_total",
            "counter",
            "Seconds from queueing to admission of requests whose adapter was not on the model when they came.",
            [(f'{{adapter="{_label(a)}"}}', s) for a, s in sorted(self._adapter_wait.items())],
        )
        family(
            "lorakit_adapters",
            "gauge",
            "Adapters by where they are.",
            [(f'{{tier="{t}"}}', n) for t, n in sorted(tiers.items())],
        )
