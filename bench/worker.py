"""One real worker flushing a large backlog, against pyarrow at its best; CPU per GiB.

    python -m bench.worker [--rows 6000000] [--rounds 3] [--tree NAME=PATH ...]

Each round appends the same backlog (``--rows`` rows of the benchmark schema in batches of
10,000, about 50 bytes of Arrow per row) to a redis-server of its own, then:

* **pyarrow at its best**: the same IPC payloads, held in memory, decoded and written as
  one zstd Parquet file with ``pq.write_table`` and its default row groups, dictionary
  encoding for every column and for string columns only; the faster of the two counts;
* **a real worker** of each code tree (``--tree``, default: this checkout; the backlog is
  appended by that tree's own producer): a plain
  ``celery -A workers.app worker -c 1`` started with that tree on ``PYTHONPATH``, asked to
  flush the table into one file (``DELTAFLUSH_MAX_FILE_BYTES`` above the backlog), timed
  from sending ``flush_table`` to its result.

Trees alternate within each round, so a before/after comparison runs on the same data in
the same minutes. CPU seconds are read from ``/proc`` for the worker's processes (its pool
process and its main process) and from ``INFO cpu`` for redis-server, and reported per GiB
of Arrow data flushed, beside pyarrow's own CPU per GiB, and the worker's peak resident set
(``VmHWM`` of its processes, the largest over the rounds). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import redis

from bench.common import machine, redis_server
from bench.throughput import realistic
from producer import Settings, wire

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process and all its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def peak_rss_mib(pid: int) -> float:
    """The peak resident set (VmHWM) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def pyarrow_best(payloads: list[bytes], path: str) -> dict[str, float]:
    """The faster of dictionary-for-all and dictionary-for-strings, as wall and CPU s."""
    best: dict[str, float] = {}
    for dictionary in ("all", "strings"):
        started, cpu = time.perf_counter(), time.process_time()
        table = pa.concat_tables(pa.ipc.open_stream(p).read_all() for p in payloads)
        use = True if dictionary == "all" else [
            f.name for f in table.schema if pa.types.is_string(f.type)]
        pq.write_table(table, path, compression="zstd", use_dictionary=use)
        wall, used = time.perf_counter() - started, time.process_time() - cpu
        del table
        if not best or wall < best["seconds"]:
            best = {"seconds": wall, "cpu_s": used}
    return best


def start_worker(tree: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(env, PYTHONPATH=str(tree))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("celery")), "-A", "workers.app", "worker",
             "-c", "1", "--loglevel=INFO", "--without-mingle", "--without-gossip"],
            env=env, cwd=tree, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not children(proc.pid) or b"ready" not in log.read_bytes():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.1)
    return proc


def worker_flush(tree: Path, env: dict[str, str], url: str, workdir: str,
                 client: redis.Redis, name: str) -> dict[str, float]:
    proc = start_worker(tree, env, Path(workdir) / f"worker-{name}.log")
    from workers.app import make_app  # this tree's app only sends the task

    app = make_app(Settings.from_env(env))
    try:
        pids = [proc.pid, *children(proc.pid)]
        cpu0, redis0 = sum(cpu_of(p) for p in pids), redis_cpu(client)
        started = time.perf_counter()
        result = app.send_task(wire.FLUSH_TASK, args=["bench"], queue=wire.QUEUE).get(
            timeout=600)
        wall = time.perf_counter() - started
        cpu = sum(cpu_of(p) for p in pids) - cpu0
        return {"seconds": wall, "flush_seconds": result["seconds"], "cpu_s": cpu,
                "peak_rss_mib": max(peak_rss_mib(p) for p in pids),
                "redis_cpu_s": redis_cpu(client) - redis0, "rows": result["rows"],
                "files": result["files"]}
    finally:
        app.close()
        proc.terminate()
        proc.wait()


#: Appends the backlog with a tree's own producer (the wire format may differ between trees).
APPEND = """
import sys
from bench.throughput import realistic
from producer import Producer, Settings
rows = int(sys.argv[1])
tables = [realistic(i, 10_000) for i in range(0, rows, 10_000)]
producer = Producer(settings=Settings.from_env())
for i in range(0, len(tables), 64):
    producer.append_many("bench", tables[i:i + 64])
producer.close()
"""


def append_with(tree: Path, env: dict[str, str], rows: int) -> None:
    subprocess.run([sys.executable, "-c", APPEND, str(rows)], env=dict(env, PYTHONPATH=str(tree)),
                   cwd=tree, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=6_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[],
                        help="NAME=PATH of a checkout to run the worker from (repeatable)")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree) or {"this": str(ROOT)}
    tables = [realistic(i, 10_000) for i in range(0, args.rows, 10_000)]
    payloads = [bytes(wire.encode_table(t)) for t in tables]
    arrow_gib = sum(t.nbytes for t in tables) / GIB
    runs: dict[str, list[dict[str, float]]] = {"pyarrow": [], **{n: [] for n in trees}}
    with redis_server("deltaflush-worker-") as (workdir, url):
        client = redis.Redis.from_url(url)
        for r in range(args.rounds):
            runs["pyarrow"].append(pyarrow_best(payloads, os.path.join(workdir, "raw.parquet")))
            for name, tree in trees.items():
                lake = os.path.join(workdir, f"lake-{name}-{r}")
                env = dict(os.environ, DELTAFLUSH_REDIS_URL=url, DELTAFLUSH_STORAGE_URI=lake,
                           DELTAFLUSH_MAX_FILE_BYTES=str(2**40), DELTAFLUSH_MAX_PENDING_BYTES="0",
                           DELTAFLUSH_FLUSH_AT_BYTES=str(2**62))
                client.flushall()
                append_with(Path(tree), env, args.rows)
                runs[name].append(worker_flush(Path(tree), env, url, workdir, client, name))
                shutil.rmtree(lake, ignore_errors=True)
                print(f"round {r}: {name} {runs[name][-1]}", file=sys.stderr)
    mib = arrow_gib * 1024
    base = statistics.median(x["seconds"] for x in runs["pyarrow"])
    print(f"machine: {json.dumps(machine())}; {args.rows} rows = {mib:.0f} MiB of Arrow; "
          f"median of {args.rounds} alternating rounds; peak RSS of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB\n")
    print("| run | MiB/s | of pyarrow at its best | CPU s/GiB (worker) | CPU s/GiB (redis) "
          "| peak RSS of the worker (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, xs in runs.items():
        seconds = statistics.median(x["seconds"] for x in xs)
        cpu = statistics.median(x["cpu_s"] for x in xs) / arrow_gib
        redis_s = statistics.median(x.get("redis_cpu_s", 0.0) for x in xs) / arrow_gib
        rss = max((x.get("peak_rss_mib", 0.0) for x in xs), default=0.0)
        print(f"| {name} | {mib / seconds:.0f} | {base / seconds:.2f} | {cpu:.2f} "
              f"| {redis_s:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
