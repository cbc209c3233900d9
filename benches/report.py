"""Writes the end-to-end benchmark report: a markdown table and a PNG chart.

``./scripts/bench --report`` runs every benchmark with ``CAIRN_BENCH_RECORD``
naming a file; each benchmark appends its figures there as JSON lines (one
per figure: Cairn's time and its baseline's, measured in the same run on the
same bytes). This script turns those lines into
``benches/results/report-DATE.md`` and ``report-DATE.png``: per scenario,
the time Cairn took next to the time its baseline took, per GiB so that
figures measured on different sizes share one axis, and the CPU seconds per
GiB each used (``cairn_cpu_s_per_gib``, ``baseline_cpu_s_per_gib``; records
without them, from older runs, show an empty cell). The records themselves
are kept as ``report-DATE.jsonl``, so the report can be rendered again from
them (``python benches/report.py benches/results/report-DATE.jsonl``).

Usage: python benches/report.py RECORDS --out-dir benches/results --command "..."
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render straight to PNG
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

GIB = 1 << 30

# Benchmarks in the order the report shows them, with a heading each.
SECTIONS = {
    "cairn-bench": "Save and restore on one node (T0 tmpfs, T1 disk)",
    "peer-bench": "Peer tier and the restore planner (two cairnd on loopback, mutual TLS)",
    "object-bench": "Object store (SeaweedFS S3 on loopback)",
    "python-bench": "Python client (PyTorch, DCP, JAX) against the frameworks' own checkpointing",
    "pod-bench": "In a pod: the CSI volume's socket from its own mount namespace, against the bare host",
}


def load(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            sys.exit(f"{path}:{n}: not a JSON line: {e}")
        missing = {"bench", "figure", "bytes", "cairn_seconds", "baseline_seconds", "baseline"} - row.keys()
        if missing:
            sys.exit(f"{path}:{n}: missing {sorted(missing)}")
        rows.append(row)
    if not rows:
        sys.exit(f"{path}: no figures recorded (did the benchmarks run?)")
    order = {bench: i for i, bench in enumerate(SECTIONS)}
    # Stable: keeps each benchmark's own order of figures.
    return sorted(rows, key=lambda r: order.get(r["bench"], len(order)))


def machine() -> str:
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        mem = f", {kib / (1 << 20):.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / (1 << 20):.0f} MiB"


def cpu_cell(value: float | None) -> str:
    """A CPU s/GiB figure, or an empty cell where it was not measured."""
    return "" if value is None else f"{value:.2f}"


def markdown(rows: list[dict], command: str, chart: str, today: str) -> str:
    out = [
        f"# Cairn benchmark report, {today}",
        "",
        f"Produced by `{command}` on {machine()}.",
        "",
        "Every figure is measured against its baseline in the same run, on the",
        "same bytes; *speed-up* is the baseline's time over Cairn's (above 1:",
        "Cairn is faster). The goals are those of `benches/README.md`. *CPU s/GiB*",
        "is the user + system CPU time the processes involved used per GiB (Cairn:",
        "the daemons and the benchmark's own client; a baseline: the process that",
        "ran it), the figure that stays meaningful on a noisy shared machine;",
        "empty where it was not measured.",
        "",
        f"![time per scenario against its baseline]({chart})",
    ]
    section = None
    for r in rows:
        if r["bench"] != section:
            section = r["bench"]
            out += [
                "",
                f"## {SECTIONS.get(section, section)}",
                "",
                "| scenario | size | Cairn s | Cairn CPU s/GiB | baseline | baseline s "
                "| baseline CPU s/GiB | speed-up | goal |",
                "|---|---:|---:|---:|---|---:|---:|---:|---|",
            ]
        speedup = r["baseline_seconds"] / r["cairn_seconds"]
        # cpu_seconds_per_gib: pod_bench.py's name for Cairn's figure.
        cpu = r.get("cairn_cpu_s_per_gib", r.get("cpu_seconds_per_gib"))
        base_cpu = r.get("baseline_cpu_s_per_gib")
        out.append(
            f"| {r['figure']} | {size(r['bytes'])} | {r['cairn_seconds']:.3f} "
            f"| {cpu_cell(cpu)} | {r['baseline']} | {r['baseline_seconds']:.3f} "
            f"| {cpu_cell(base_cpu)} | {speedup:.2f} | {r.get('goal', '')} |"
        )
    return "\n".join(out) + "\n"


def chart(rows: list[dict], path: Path, today: str) -> None:
    labels = [f"{r['figure']}\nvs {r['baseline']}" for r in rows]
    cairn = [r["cairn_seconds"] * GIB / r["bytes"] for r in rows]
    base = [r["baseline_seconds"] * GIB / r["bytes"] for r in rows]
    height = 0.38
    fig, ax = plt.subplots(figsize=(12, 0.62 * len(rows) + 1.6))
    ys = range(len(rows))
    ax.barh([y - height / 2 for y in ys], cairn, height, label="Cairn", color="#2b6cb0")
    ax.barh([y + height / 2 for y in ys], base, height, label="baseline (same run)", color="#a0aec0")
    for y, (c, b) in enumerate(zip(cairn, base)):
        ax.text(c, y - height / 2, f" {c:.2f}", va="center", fontsize=7)
        ax.text(b, y + height / 2, f" {b:.2f}", va="center", fontsize=7)
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=6)
    ax.set_xlabel("seconds per GiB (log scale; shorter is better)")
    ax.set_title(f"Cairn against its baselines, {today}")
    ax.legend(loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path, help="the JSON lines the benchmarks appended")
    parser.add_argument("--out-dir", type=Path, default=Path("benches/results"))
    parser.add_argument("--command", default="./scripts/bench --report", help="the command to cite")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    args = parser.parse_args()
    rows = load(args.records)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    png = args.out_dir / f"report-{args.date}.png"
    md = args.out_dir / f"report-{args.date}.md"
    records = args.out_dir / f"report-{args.date}.jsonl"
    if records.resolve() != args.records.resolve():
        records.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    chart(rows, png, args.date)
    md.write_text(markdown(rows, args.command, png.name, args.date))
    print(f"wrote {md}, {png} and {records} ({len(rows)} figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
