"""`ttrun ... --ranks N` on one machine: N processes of the same command, one per rank.

This process serves the group's store (so the store outlives any rank, and a survivor
can always find out which rank died), starts the ranks with torchrun's variables (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE: the store is served
elsewhere), and waits. Rank 0's output is the command's output; the other ranks print
only errors. When a rank fails, the others stop by themselves (ranks.py) and record in
the store which ranks went silent; those (dead, or frozen) are ended here. Any rank still
running `grace_s` after the first failure is ended too, with a line naming it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from .ranks import RankConfig


def rank_env(base: dict, rank: int, world: int, port: int, threads: int) -> dict:
    """The environment of rank `rank`, as torchrun would set it (plus a thread share)."""
    env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    env.setdefault("OMP_NUM_THREADS", str(threads))  # N ranks share the cores
    return env


def launch(command: list[str], world: int, grace_s: float = 60.0, env: dict | None = None) -> int:
    """Run `command` as ranks 0..world-1; returns 0, or the exit status of the first rank
    that failed (1 for a rank ended by a signal)."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=grace_s), wait_for_workers=False)
    base = dict(os.environ if env is None else env)
    threads = max(1, (os.cpu_count() or 1) // world)
    procs = [subprocess.Popen(command, env=rank_env(base, r, world, store.port, threads),
                              stdout=None if r == 0 else subprocess.DEVNULL)
             for r in range(world)]
    try:
        return _wait(procs, grace_s, dist.PrefixStore(RankConfig(0, world).store_prefix, store))
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        _reap(procs, 10.0)
        return 130
    finally:
        del store


def _wait(procs, grace_s: float, store) -> int:
    """Wait for every rank; after the first failure, end the ranks the others found silent
    at once and any other within `grace_s`."""
    first, deadline = None, None
    while any(p.poll() is None for p in procs):
        if first is None:
            failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                first, deadline = failed[0], time.monotonic() + grace_s
        if first is not None:
            for r in _named_silent(store):
                if procs[r].poll() is None:
                    procs[r].kill()
        if deadline is not None and time.monotonic() > deadline:
            running = [r for r, p in enumerate(procs) if p.poll() is None]
            print(f"ttrun: error: rank {first} {_how(procs[first].returncode)} and {_ranks(running)} did not stop "
                  f"within {grace_s:.0f} s; ended {'it' if len(running) == 1 else 'them'}", file=sys.stderr)
            _reap(procs, 5.0)
            break
        time.sleep(0.1)
    codes = [p.returncode for p in procs]
    if first is None:
        first = next((r for r, c in enumerate(codes) if c), None)
    return 0 if first is None else (codes[first] if codes[first] > 0 else 1)


def _named_silent(store) -> list[int]:
    """The ranks the survivors recorded as silent (ranks.RankGroup._record), if any yet."""
    if not store.check(["dead"]):
        return []
    ranks = store.get("dead").decode().partition("|")[0]
    return [int(r) for r in ranks.split(",") if r]


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _how(code: int) -> str:
    if code < 0:
        return f"was ended by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _reap(procs, wait_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + wait_s
    for p in procs:
        try:
            p.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
