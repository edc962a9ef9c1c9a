"""Server metrics in the Prometheus text format (`GET /metrics`), per model (the base model or an adapter).

Counters: finished requests by outcome, requests refused before queueing by HTTP status, prompt and generated
tokens, request seconds. Gauges: generated tokens per second over the last `window` seconds, and the queue
depth and running sequences that the scheduler reports at the time of the scrape.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping


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

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()

    def render(self, queued: dict[str, int], running: dict[str, int], models: list[str]) -> str:
        """The exposition text; `queued` and `running` count sequences per model now."""
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
        return "\n".join(lines) + "\n"
