"""Cost of reading load from a real vLLM /metrics page: our parser against a full Prometheus parse.

    .venv/bin/python -m bench.parse_cost
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from control_plane.observe.metrics_parser import parse_loads

PAGES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vllm"


def per_call_ms(function, page: str, seconds: float = 1.0) -> float:
    """Median over 5 rounds of the mean time per call."""
    rounds = []
    for _ in range(5):
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 5:
            function(page)
            calls += 1
        rounds.append((time.perf_counter() - started) / calls * 1000)
    return statistics.median(rounds)


def main() -> None:
    for name in ("metrics-idle.txt", "metrics-busy.txt"):
        page = (PAGES / name).read_text()
        ours = per_call_ms(parse_loads, page)
        full = per_call_ms(lambda p: list(text_string_to_metric_families(p)), page)
        print(f"{name} ({len(page) // 1024} kB): parse_loads {ours:.3f} ms, prometheus-client {full:.2f} ms "
              f"({full / ours:.0f}x)")


if __name__ == "__main__":
    main()
