"""Run every benchmark and write the results as a Markdown table and a PNG plot.

    python -m bench [--out bench/results] [--quick]

Each benchmark starts its own redis-server (and, for the fleet ones, real Celery worker
processes). The machine is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import fleet, memory, throughput
from bench.common import machine, redis_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = 200_000 if args.quick else 2_000_000
    tp = throughput.run(rows, 10_000, 1 if args.quick else 3)
    mem = memory.run(8 if args.quick else 128, [1, 5, 10])
    with redis_server() as (workdir, url):
        scale = fleet.scale_out(workdir, url, 50_000 if args.quick else 1_000_000,
                                repeat=1 if args.quick else 3)
        fresh = fleet.freshness(workdir, url, 5 if args.quick else 30, 2)
    results = {"machine": machine(), "throughput": tp, "memory": mem, "scale_out": scale,
               "freshness": fresh}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "RESULTS.md").write_text(render(results))
    plot(results, out / "results.png")
    print(render(results))
    print(f"wrote {out}/RESULTS.md, results.json and results.png")


def render(r: dict) -> str:
    tp, fresh = r["throughput"], r["freshness"]
    lines = [f"machine: `{json.dumps(r['machine'])}`", "",
             "| measure | deltaflush | limit / target | ratio |", "| --- | --- | --- | --- |",
             f"| flush MiB/s ({tp['rows']} rows) | {tp['flush_mib_s']} "
             f"| {tp['flush_raw_mib_s']} pyarrow alone | {tp['flush_ratio']} |",
             f"| produce MiB/s, append_many | {tp['produce_mib_s']} "
             f"| {tp['produce_raw_mib_s']} raw pipelined XADD of encoded payloads "
             f"| {tp['produce_ratio']} |",
             f"| produce MiB/s, append_many | {tp['produce_encoding_mib_s']} "
             f"| {tp['produce_encoding_raw_mib_s']} pyarrow encode + raw pipelined XADD "
             f"| {tp['produce_encoding_ratio']} |",
             f"| produce MiB/s, append one by one | {tp['append_mib_s']} "
             f"| {tp['append_raw_mib_s']} one raw XADD per call | {tp['append_ratio']} |"]
    for s in r["scale_out"]:
        lines.append(f"| rows/s, {s['processes']} worker processes (speed-up {s['speedup']}x) "
                     f"| {s['rows_s']} | {s['limit_rows_s']} pyarrow alone in {s['processes']} "
                     f"processes (speed-up {s['limit_speedup']}x) | {s['of_limit']} |")
    for m in r["memory"]:
        lines.append(f"| peak RSS MiB, backlog {m['multiple']}x the file target | "
                     f"{m['peak_rss_mib']} | | |")
    lines.append(f"| freshness p50 / p99 s (interval {fresh['interval_s']:g} s) "
                 f"| {fresh['p50_s']} / {fresh['p99_s']} | interval + 1 s | |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    tp = r["throughput"]
    ax = axes[0]
    ax.bar(["flush", "flush limit", "produce", "produce limit"],
           [tp["flush_mib_s"], tp["flush_raw_mib_s"], tp["produce_mib_s"],
            tp["produce_raw_mib_s"]], color=["C0", "C7", "C1", "C7"])
    ax.set_ylabel("MiB/s of Arrow data")
    ax.set_title("Throughput against the limit")
    ax = axes[1]
    procs = [s["processes"] for s in r["scale_out"]]
    ax.plot(procs, [s["rows_s"] / 1e6 for s in r["scale_out"]], marker="o", label="measured")
    ax.plot(procs, [s["limit_rows_s"] / 1e6 for s in r["scale_out"]], marker="s",
            linestyle="--", color="C7", label="pyarrow alone, same work (the limit)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_xticks(procs)
    ax.set_xlabel("worker processes")
    ax.set_ylabel("million rows/s")
    ax.set_title(f"Scale-out ({r['machine']['cores']} cores)")
    ax = axes[2]
    mem = r["memory"]
    ax.plot([m["backlog_mib"] for m in mem], [m["peak_rss_mib"] for m in mem], marker="o",
            label="measured")
    target = mem[0]["backlog_mib"] / mem[0]["multiple"]
    ax.axhline(2 * target + 150, linestyle="--", color="C7",
               label="target: 2x file size + 150 MiB")
    ax.legend()
    ax.set_xlabel("backlog MiB")
    ax.set_ylabel("peak RSS MiB")
    ax.set_ylim(bottom=0)
    ax.set_title("Flush memory against backlog")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
