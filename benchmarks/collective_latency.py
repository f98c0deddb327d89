"""Latency of torch.distributed collectives between ranks on one machine, against a raw socket round trip.

Data-parallel ClippedPPO all-reduces the gradient once per minibatch step, so on small networks the
collective's latency, not its bandwidth, decides how well ranks scale (``docs/distributed.md``). Run:

    torchrun --standalone --nproc_per_node=2 benchmarks/collective_latency.py [--out FILE.json]

Rank 0 prints (and writes) the median over repetitions of: a gloo ``all_reduce`` of 3, 9,155 (CartPole's
policy) and 142,605 (HalfCheetah's) float32 values, a ``send``/``recv`` round trip and a ``barrier``; and a
``socketpair`` round trip between two plain processes, the floor any transport on this machine pays.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable

import torch as th
import torch.distributed as dist

SIZES = {
    "3 floats": 3,
    "CartPole MLP gradient (9,155 floats)": 9_155,
    "HalfCheetah MLP gradient (142,605 floats)": 142_605,
}


def socket_round_trip_us(repetitions: int = 2000) -> float:
    """Median of blocks of round trips of one byte between this process and a forked child."""
    parent, child = socket.socketpair()
    if os.fork() == 0:  # the child answers every message, then leaves without cleanup
        for _ in range(repetitions):
            child.recv(1)
            child.send(b"x")
        os._exit(0)
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        parent.send(b"x")
        parent.recv(1)
        times.append(time.perf_counter() - start)
    os.wait()
    return statistics.median(times) * 1e6


def median_us(function: Callable[[], object], repetitions: int) -> float:
    """Median wall time of ``function`` in microseconds, after a warm-up, ranks lined up by a barrier."""
    for _ in range(20):
        function()
    dist.barrier()
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    """Measure on every rank; rank 0 reports."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON file for rank 0's results")
    parser.add_argument("--repetitions", type=int, default=300)
    args = parser.parse_args()
    th.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, float] = {}
    for name, size in SIZES.items():
        tensor = th.randn(size)
        results[f"all_reduce, {name}"] = median_us(lambda t=tensor: dist.all_reduce(t), args.repetitions)
    small = th.zeros(3)

    def round_trip() -> None:
        if rank == 0:
            dist.send(small, 1)
            dist.recv(small, 1)
        elif rank == 1:
            dist.recv(small, 0)
            dist.send(small, 0)

    if world >= 2:
        results["send/recv round trip, ranks 0 and 1"] = median_us(round_trip, args.repetitions)
    results["barrier"] = median_us(dist.barrier, args.repetitions)
    dist.barrier()
    if rank == 0:
        results["socketpair round trip, two plain processes"] = socket_round_trip_us()
        report = {
            "world_size": world,
            "backend": "gloo",
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": th.__version__,
            "median_us": results,
        }
        for name, value in results.items():
            print(f"{name:55s} {value:9.1f} us")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
