"""The benchmark's table: medians per target, ratios, and the goals beside them."""

from __future__ import annotations

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


def render(console: Console, image: ImageFacts, results: list[TargetResult], runs: int) -> None:
    console.print(
        f"image: {image.files_bytes / 2**30:.2f} GiB of files; plain image "
        f"{image.plain_bytes / 1e6:.0f} MB (gzip layers), apull image "
        f"{image.apull_bytes / 1e6:.0f} MB (EROFS blobs); medians of {runs} cold runs"
    )
    table = Table(title="apull lazy pull vs full pull (overlayfs)")
    for column in (
        "target",
        "backend",
        "first output: lazy",
        "full",
        "speedup",
        "served by then: lazy",
        "% of image",
        "full",
        "cold read",
        "HTTP GET",
        "cold/HTTP",
        "warm read",
    ):
        table.add_column(column, justify="right" if column not in ("target", "backend") else "left")
    verdicts = []
    for result in results:
        s = result.summary(image)
        table.add_row(
            result.name,
            result.backend,
            f"{s['lazy_first_output_s']:.2f} s",
            f"{s['full_first_output_s']:.2f} s",
            f"{s['speedup']:.1f}x",
            _mb(s["lazy_bytes"]),
            f"{s['lazy_bytes_pct_of_image']:.3f}%",
            _mb(s["full_bytes"]),
            f"{s['cold_read_mb_s']:.0f} MB/s",
            f"{s['http_mb_s']:.0f} MB/s",
            f"{s['cold_vs_http']:.2f}",
            f"{s['warm_read_mb_s']:.0f} MB/s",
        )
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
