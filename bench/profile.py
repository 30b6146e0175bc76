"""Where a flush and an append spend their time: pyinstrument call trees (wall clock, main
thread, so waits on the reader and encoder threads show as such) and the CPU each side uses.

    python -m bench.profile [--rows 2000000]

Ends with the CPU budget of a flush: what it spends beside the Parquet encoding, and the
speed-up of two workers over one that this allows on two cores.

Starts its own redis-server. For a sampling view of every thread, run the same under py-spy:
``py-spy record --threads --idle -o flush.svg -- python -m bench.profile``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable

import pyarrow as pa
import redis
from pyinstrument import Profiler

from bench.common import machine, redis_server
from bench.throughput import raw_parquet, realistic
from producer import Producer, Settings, wire
from producer.client import connect
from workers.flusher import Flusher
from workers.storage import Storage


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000)
    args = parser.parse_args()
    with redis_server("deltaflush-profile-") as (workdir, url):
        client = connect(url)
        settings = Settings(redis_url=url, max_pending_bytes=0, max_file_bytes=2**40)
        tables = [realistic(i, 10_000) for i in range(0, args.rows, 10_000)]
        producer = Producer(settings=settings)
        # One round first, so that the profiled one runs in steady state (memory already
        # faulted in and reused, as in a long-running producer), not on a cold process.
        for i in range(0, len(tables), 64):
            producer.append_many("warmup", tables[i:i + 64])
        client.delete("deltaflush:{warmup}:delta")

        def redis_cpu() -> float:
            info = client.info("cpu")
            return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

        print(f"machine: {machine()}; {args.rows} rows in batches of 10,000\n")
        for name in ("produce", "flush"):
            profiler = Profiler(interval=0.0005)
            cpu, rcpu, started = _cpu(), redis_cpu(), time.perf_counter()
            with profiler:
                if name == "produce":
                    for i in range(0, len(tables), 64):
                        producer.append_many("bench", tables[i:i + 64])
                else:
                    Flusher(client, Storage(os.path.join(workdir, "lake")), settings) \
                        .flush("bench")
            wall = time.perf_counter() - started
            print(f"## {name}: {wall:.3f} s wall, this process {_cpu() - cpu:.3f} s CPU, "
                  f"redis-server {redis_cpu() - rcpu:.3f} s CPU\n")
            print(profiler.output_text(unicode=False, color=False))
        budget(client, producer, tables, settings, workdir, redis_cpu)
        producer.close()


def budget(client: redis.Redis, producer: Producer, tables: list[pa.Table],
           settings: Settings, workdir: str, redis_cpu: Callable[[], float]) -> None:
    """The CPU a flush spends beside the Parquet encoding itself, and what that allows two
    workers on a machine of two cores (median of 3 rounds, without the profiler).

    One worker flushes a table in at least E seconds (its encoding, pyarrow alone's time);
    two workers on two cores flush two tables in at least E + O, where O is all the other
    CPU of one flush (reading, decoding, Redis serving it). So two workers are at most
    2E / (E + O) times one; 1.8x needs O <= E / 9."""
    payloads = [bytes(wire.encode_table(t)) for t in tables]
    rounds = []
    for r in range(3):
        client.delete("deltaflush:{budget}:delta")
        for i in range(0, len(tables), 64):
            producer.append_many("budget", tables[i:i + 64])
        cpu, rcpu = _cpu(), redis_cpu()
        Flusher(client, Storage(os.path.join(workdir, f"budget{r}")), settings).flush("budget")
        flush_cpu, serve_cpu = _cpu() - cpu, redis_cpu() - rcpu
        cpu = _cpu()
        raw_parquet(payloads, os.path.join(workdir, "budget-raw.parquet"))
        rounds.append((_cpu() - cpu, flush_cpu, serve_cpu))
    encode, flush_cpu, serve_cpu = (statistics.median(x) for x in zip(*rounds, strict=True))
    other = flush_cpu + serve_cpu - encode
    print(f"## CPU budget of one flush (median of 3)\n\n"
          f"E, pyarrow alone: {encode:.3f} s; the flush: {flush_cpu:.3f} s in the worker + "
          f"{serve_cpu:.3f} s in redis-server; O, all but the encoding: {other:.3f} s\n"
          f"two workers on two cores: at most 2E / (E + O) = {2 * encode / (encode + other):.2f}x"
          f" one worker; 1.8x needs O <= E / 9 = {encode / 9:.3f} s")


if __name__ == "__main__":
    main()
