"""The benchmark's table: medians per target, ratios, and the goals beside them."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from apull.bench.run import ImageFacts, TargetResult

GOAL_SPEEDUP = 40.0
GOAL_BYTES_PCT = 0.5
GOAL_COLD_VS_HTTP = 0.7


def _mb(value: float) -> str:
    return f"{value / 1e6:.2f} MB" if value < 10e6 else f"{value / 1e6:.0f} MB"


def _mark(ok: bool) -> str:
    return "[green]ok[/]" if ok else "[red]below goal[/]"


def _cpu(summary: dict[str, float], what: str) -> str:
    """'0.80 of 1.03 s (registry 0.24)': CPU seconds busy of those the target had."""
    return (
        f"{summary[what + '_cpu_busy_s']:.2f} of {summary[what + '_cpu_capacity_s']:.2f} s "
        f"(registry {summary[what + '_registry_cpu_s']:.2f})"
    )


def render(console: Console, image: ImageFacts, results: list[TargetResult], runs: int) -> None:
    console.print(
        f"image: {image.files_bytes / 2**30:.2f} GiB of files; plain image "
        f"{image.plain_bytes / 1e6:.0f} MB (gzip layers), apull image "
        f"{image.apull_bytes / 1e6:.0f} MB (EROFS blobs); medians of {runs} cold runs"
    )
    table = Table(title="apull lazy pull vs full pull (overlayfs)")
    table.add_column("measure")
    summaries = [(r, r.summary(image)) for r in results]
    for result, _ in summaries:
        table.add_column(f"{result.name} ({result.backend})", justify="right")
    rows: list[tuple[str, Callable[[dict[str, float]], str]]] = [
        ("first output, lazy (apull)", lambda s: f"{s['lazy_first_output_s']:.2f} s"),
        ("first output, full pull", lambda s: f"{s['full_first_output_s']:.2f} s"),
        ("speedup", lambda s: f"{s['speedup']:.1f}x"),
        ("served by first output, lazy", lambda s: _mb(s["lazy_bytes"])),
        ("  % of the image", lambda s: f"{s['lazy_bytes_pct_of_image']:.3f}%"),
        ("served by first output, full", lambda s: _mb(s["full_bytes"])),
        ("cold read through apulld", lambda s: f"{s['cold_read_mb_s']:.0f} MB/s"),
        ("plain HTTP GET of the blob", lambda s: f"{s['http_mb_s']:.0f} MB/s"),
        ("  cold read / HTTP", lambda s: f"{s['cold_vs_http']:.2f}"),
        ("  CPU busy in the cold read", lambda s: _cpu(s, "cold_read")),
        ("  CPU busy in the HTTP GET", lambda s: _cpu(s, "http")),
        ("warm read through apulld", lambda s: f"{s['warm_read_mb_s']:.0f} MB/s"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(s) for _, s in summaries))
    verdicts = []
    for result, s in summaries:
        verdicts.append(
            f"{result.name}: speedup {s['speedup']:.1f}x (goal {GOAL_SPEEDUP:.0f}x) "
            f"{_mark(s['speedup'] >= GOAL_SPEEDUP)}; bytes {s['lazy_bytes_pct_of_image']:.3f}% "
            f"(goal < {GOAL_BYTES_PCT}%) {_mark(s['lazy_bytes_pct_of_image'] < GOAL_BYTES_PCT)}; "
            f"cold/HTTP {s['cold_vs_http']:.2f} (goal {GOAL_COLD_VS_HTTP}) "
            f"{_mark(s['cold_vs_http'] >= GOAL_COLD_VS_HTTP)}"
        )
    console.print(table)
    for line in verdicts:
        console.print(line)
