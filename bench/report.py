"""Bench results: one row per figure, its baseline from the same run, and their ratio.

Every workload returns a ``Report``; ``pdx-bench`` prints it as a table and, with
``--json PATH``, writes ``{"workload", "environment", "results": [...]}`` where each
result has ``name, value, unit`` and, where a baseline exists,
``baseline_name, baseline, ratio``.

``ratio`` is always "pdx relative to baseline, higher is better": value/baseline
for throughputs and baseline/value for latencies (``lower_is_better=True``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Result:
    name: str
    value: float
    unit: str
    baseline_name: str | None = None
    baseline: float | None = None
    ratio: float | None = None
    lower_is_better: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline:
            if self.lower_is_better:
                self.ratio = self.baseline / self.value if self.value else None
            else:
                self.ratio = self.value / self.baseline

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["extra"]:
            del d["extra"]
        for k in ("baseline_name", "baseline", "ratio"):
            if d[k] is None:
                del d[k]
        return d


@dataclass
class Report:
    workload: str
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=lambda: environment())

    def add(self, result: Result) -> Result:
        self.results.append(result)
        return result

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "environment": self.environment,
            "notes": self.notes,
            "results": [r.to_json() for r in self.results],
        }

    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")

    def table(self) -> str:
        rows = [("name", "value", "unit", "baseline", "baseline value", "ratio")]
        for r in self.results:
            rows.append((
                r.name, _fmt(r.value), r.unit, r.baseline_name or "-",
                _fmt(r.baseline) if r.baseline is not None else "-",
                f"{r.ratio:.2f}" if r.ratio is not None else "-",
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"# {self.workload}"]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.4f}"


def environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def gbps(nbytes: int, seconds: float) -> float:
    """GB/s with GB = 1e9 bytes."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def percentile(xs: Iterable[float], p: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def progress(items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` while showing ``label i/total`` on stderr (a TTY gets one updating line)."""
    items = list(items) if total is None else items
    n = total if total is not None else len(items)  # type: ignore[arg-type]
    tty = sys.stderr.isatty()
    start = time.monotonic()
    for i, item in enumerate(items, 1):
        msg = f"{label}: {i}/{n}"
        if tty:
            sys.stderr.write(f"\r{msg} ({time.monotonic() - start:.0f}s)\x1b[K")
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()
        yield item
    if tty:
        sys.stderr.write("\n")
