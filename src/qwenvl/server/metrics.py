"""Server counters, rendered in the Prometheus text exposition format (``GET /metrics``)."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from typing import Any

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for bound, c in zip(self.buckets, self.counts):
            cum += c
            out.append(f'{name}_bucket{{le="{bound}"}} {cum}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """Counters updated by request handlers (one event loop, but guarded for the odd thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()  # (endpoint, status code)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.vision_tokens = 0
        self.images = 0
        self.videos = 0
        self.aborted = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(TTFT_BUCKETS)

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def add(self, **values: int) -> None:
        with self._lock:
            for name, v in values.items():
                setattr(self, name, getattr(self, name) + v)

    def render(self, gauges: dict[str, float], engine_stats: dict[str, Any]) -> str:
        p = "qwenvl"
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[str]) -> None:
            lines.append(f"# HELP {p}_{name} {help}")
            lines.append(f"# TYPE {p}_{name} {kind}")
            lines.extend(samples)

        with self._lock:
            metric(
                "requests_total",
                "counter",
                "HTTP requests by endpoint and status code.",
                [
                    f'{p}_requests_total{{endpoint="{e}",code="{c}"}} {n}'
                    for (e, c), n in sorted(self.requests.items())
                ],
            )
            for name, value, help in (
                ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens (vision included)."),
                ("generation_tokens_total", self.generation_tokens, "Generated tokens."),
                ("vision_tokens_total", self.vision_tokens, "Image and video tokens in prompts."),
                ("images_total", self.images, "Images in prompts."),
                ("videos_total", self.videos, "Videos in prompts."),
                ("aborted_requests_total", self.aborted, "Requests whose client went away."),
            ):
                metric(name, "counter", help, [f"{p}_{name} {value}"])
            metric(
                "time_to_first_token_seconds",
                "histogram",
                "From request arrival to the first generated token.",
                self.ttft.lines(f"{p}_time_to_first_token_seconds"),
            )
            metric(
                "request_latency_seconds",
                "histogram",
                "From request arrival to the last token.",
                self.e2e.lines(f"{p}_request_latency_seconds"),
            )
        for name, value in gauges.items():
            metric(name, "gauge", name.replace("_", " ") + ".", [f"{p}_{name} {value}"])
        for name, value in engine_stats.items():
            kind = "gauge" if name in ("free_blocks", "num_blocks") else "counter"
            metric(
                f"engine_{name}",
                kind,
                f"LLMEngine.stats[{name!r}].",
                [f"{p}_engine_{name} {value}"],
            )
        return "\n".join(lines) + "\n"
