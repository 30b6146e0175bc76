"""Where a flush and an append spend their time: pyinstrument call trees (wall clock, main
thread, so waits on the reader and encoder threads show as such) and the CPU each side uses.

    python -m bench.profile [--rows 2000000]

Starts its own redis-server. For a sampling view of every thread, run the same under py-spy:
``py-spy record --threads --idle -o flush.svg -- python -m bench.profile``.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from pyinstrument import Profiler

from bench.common import machine, redis_server
from bench.throughput import realistic
from producer import Producer, Settings
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
        producer.close()


if __name__ == "__main__":
    main()
