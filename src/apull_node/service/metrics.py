"""Prometheus metrics of the node services: counters, histograms and their text.

Each service keeps one `Registry` of the metrics it updates (daemon/apulld_metrics.py,
snapshotter/snapshotter_metrics.py); metrics_endpoint.py serves its `render()` at
GET /metrics. The text is Prometheus' exposition format 0.0.4: a `# HELP` and a `# TYPE`
line per metric, then one sample a line, series in the order of their label values.

Names follow Prometheus' conventions: the `apull_` prefix, base units (`_bytes`,
`_seconds`), counters ending in `_total`. A label takes few values (an HTTP status, a
backend), never a digest or another value without bound: a metric keeps at most
`max_series` label sets, and counts whatever comes after them under the values `other`.

Updates are cheap enough for every chunk and request: one lock-protected add on a series
the caller may keep (`labels()` once, then `inc()`/`observe()` on what it returned).
Standard library only (this package ships inside both node binaries).
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from collections.abc import Sequence
from typing import ClassVar, Generic, TypeVar, Union

#: What GET /metrics answers with.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Label sets a metric keeps before it folds new ones into OVERFLOW_VALUE.
MAX_SERIES = 64
OVERFLOW_VALUE = "other"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_Number = Union[int, float]


def escape_label_value(value: str) -> str:
    """A label value as it goes between double quotes: backslash, quote, newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: backslash and newline escaped (quotes stay)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: _Number) -> str:
    """A sample value: integers as they are, floats as Python writes them (Go's forms for
    infinities and NaN)."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _labels_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values))
    return "{" + pairs + "}"


_Series = TypeVar("_Series")


class _Metric(Generic[_Series]):
    """One metric: its name, help, label names and a series per label set."""

    kind: ClassVar[str]

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), max_series: int = MAX_SERIES
    ) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"metric name {name!r} is not a Prometheus name")
        for label in labelnames:
            if not _LABEL_NAME.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"{name}: label name {label!r} is not allowed")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"{name}: label names repeat: {labelnames!r}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self.max_series = max(1, max_series)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], _Series] = {}
        if not self.labelnames:
            self._series[()] = self._new_series()

    def _new_series(self) -> _Series:
        raise NotImplementedError

    def labels(self, *values: str) -> _Series:
        """The series of these label values (one per label name, in order), made on first
        use; past `max_series` label sets, the shared series of OVERFLOW_VALUE."""
        if len(values) != len(self.labelnames):
            raise ValueError(
                f"{self.name}: expected values for {self.labelnames!r}, got {values!r}"
            )
        with self._lock:
            series = self._series.get(values)
            if series is None:
                if len(self._series) >= self.max_series:
                    values = (OVERFLOW_VALUE,) * len(values)
                    series = self._series.get(values)
                if series is None:
                    series = self._series[values] = self._new_series()
        return series

    def _unlabelled(self) -> _Series:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames!r}: use labels()")
        return self._series[()]

    def render(self) -> list[str]:
        """The metric's lines: HELP, TYPE, then its samples."""
        with self._lock:
            series = sorted(self._series.items())
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for values, one in series:
            lines.extend(self._samples(values, one))
        return lines

    def _samples(self, values: tuple[str, ...], series: _Series) -> list[str]:
        raise NotImplementedError


class CounterSeries:
    """One label set of a counter."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: _Number = 0

    def inc(self, amount: _Number = 1) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up (got {amount!r})")
        with self._lock:
            self._value += amount

    @property
    def value(self) -> _Number:
        with self._lock:
            return self._value


class Counter(_Metric[CounterSeries]):
    """Goes up only; its name ends in `_total`."""

    kind = "counter"

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), max_series: int = MAX_SERIES
    ) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} does not end in _total")
        super().__init__(name, help, labelnames, max_series)

    def _new_series(self) -> CounterSeries:
        return CounterSeries()

    def inc(self, amount: _Number = 1) -> None:
        """Add to a counter without labels."""
        self._unlabelled().inc(amount)

    @property
    def value(self) -> _Number:
        return self._unlabelled().value

    def _samples(self, values: tuple[str, ...], series: CounterSeries) -> list[str]:
        labels = _labels_text(self.labelnames, values)
        return [f"{self.name}{labels} {format_value(series.value)}"]


class HistogramSeries:
    """One label set of a histogram: a count per bucket (not cumulative), sum and count."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._lock = threading.Lock()
        self._buckets = [0] * (len(bounds) + 1)  # the last one: above every bound
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self._bounds, value)  # bounds are inclusive (le)
        with self._lock:
            self._buckets[index] += 1
            self._sum += value
            self._count += 1

    def snapshot(self) -> tuple[list[int], float, int]:
        """Cumulative bucket counts (the last is +Inf), sum and count, taken together."""
        with self._lock:
            buckets, total, count = list(self._buckets), self._sum, self._count
        running = 0
        for index, amount in enumerate(buckets):
            running += amount
            buckets[index] = running
        return buckets, total, count


class Histogram(_Metric[HistogramSeries]):
    """Observations counted into fixed buckets (upper bounds, inclusive), with their sum."""

    kind = "histogram"

    def __init__(
        self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = (),
        max_series: int = MAX_SERIES,
    ) -> None:  # fmt: skip
        bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        if not bounds or list(bounds) != sorted(set(bounds)) or any(map(math.isnan, bounds)):
            raise ValueError(f"{name}: buckets must be finite, increasing, at least one")
        self.bounds = bounds
        super().__init__(name, help, labelnames, max_series)

    def _new_series(self) -> HistogramSeries:
        return HistogramSeries(self.bounds)

    def observe(self, value: float) -> None:
        """Observe on a histogram without labels."""
        self._unlabelled().observe(value)

    def _samples(self, values: tuple[str, ...], series: HistogramSeries) -> list[str]:
        buckets, total, count = series.snapshot()
        names = (*self.labelnames, "le")
        lines = []
        for bound, cumulative in zip((*self.bounds, math.inf), buckets):
            labels = _labels_text(names, (*values, format_value(bound)))
            lines.append(f"{self.name}_bucket{labels} {cumulative}")
        labels = _labels_text(self.labelnames, values)
        lines.append(f"{self.name}_sum{labels} {format_value(total)}")
        lines.append(f"{self.name}_count{labels} {count}")
        return lines


class Registry:
    """A service's metrics, rendered together in the order they were made."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, Counter | Histogram] = {}

    def _add(self, metric: Counter | Histogram) -> None:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is registered already")
            self._metrics[metric.name] = metric

    def counter(
        self, name: str, help: str, labelnames: Sequence[str] = (), max_series: int = MAX_SERIES
    ) -> Counter:
        metric = Counter(name, help, labelnames, max_series)
        self._add(metric)
        return metric

    def histogram(
        self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = (),
        max_series: int = MAX_SERIES,
    ) -> Histogram:  # fmt: skip
        metric = Histogram(name, help, buckets, labelnames, max_series)
        self._add(metric)
        return metric

    def render(self) -> str:
        """Every metric in the exposition format 0.0.4, ending with a newline."""
        with self._lock:
            metrics = list(self._metrics.values())
        lines: list[str] = []
        for metric in metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
