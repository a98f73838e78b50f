"""The emulator's chips spread over processes: ranks of a torch.distributed (gloo) group.

A rank holds one equal block of the mesh (RankLayout): its mesh values (mesh.py) carry
only its block of the leading dimensions, its weights are only its chips' shards, its KV
pools only its chips' pools. Every op runs locally as in one process. A collective along
a mesh axis that the blocks cut (RankGroup.full_along) all_gathers the blocks of the
ranks along that axis, so the existing collective (mesh.MESH_COLLECTIVES) sees the whole
stack and sums in the same order: results are bit for bit those of one process. A
collective's result is replicated along its axis (a leading dimension of 1), so every
rank keeps all of it. Collectives along an axis a rank holds whole stay local.

Failure: every rank beats a counter in the group's store (a thread, every heartbeat_s).
When a collective fails (gloo raises when a peer's socket closes, or after timeout_s),
the rank finds the ranks whose beat stopped, records them once in the store (the first
finder's account wins, so every rank tells the same story), and raises RankFailure
naming them. Only the lowest surviving rank prints it (RankFailure.report).

The environment (RANK, WORLD_SIZE, MASTER_ADDR...) is read by the CLI only, which hands
RankConfig.from_env a mapping. This module imports torch only inside RankGroup.
"""
from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass


class RankFailure(RuntimeError):
    """Another rank died or hung; `report`: this rank is the one that should say so."""

    def __init__(self, message: str, report: bool = True):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class RankConfig:
    """How this process joins the group: every setting of the multi-process emulator."""

    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    store_elsewhere: bool = False  # the store is served by the launcher or torchrun's agent, not rank 0
    timeout_s: float = 30.0  # a collective waits this long for a silent peer
    join_timeout_s: float = 300.0  # every rank must have started within this
    heartbeat_s: float = 0.5
    silence_s: float = 3.0  # no beat for this long: the rank is dead or frozen
    run_tag: str = "0"  # separates runs sharing a store (torchrun restarts)

    @property
    def store_prefix(self) -> str:
        """This run's keys in the store (launch.py reads the same)."""
        return f"ttrun/{self.run_tag}"

    @classmethod
    def from_env(cls, env, **overrides) -> "RankConfig | None":
        """From torchrun's (or ttrun --ranks') variables; None when WORLD_SIZE is absent or 1."""
        world = int(env.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return None
        try:
            rank = int(env["RANK"])
            port = int(env.get("MASTER_PORT", "29500"))
        except (KeyError, ValueError):
            raise ValueError("WORLD_SIZE is set but RANK or MASTER_PORT is missing or not a number") from None
        if not 0 <= rank < world:
            raise ValueError(f"RANK {rank} is not in 0..{world - 1}")
        return cls(rank, world, env.get("MASTER_ADDR", "127.0.0.1"), port,
                   env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
                   run_tag=env.get("TORCHELASTIC_RESTART_COUNT", "0"), **overrides)


@dataclass(frozen=True)
class RankLayout:
    """A `mesh_shape` mesh cut into `world` equal blocks: `grid` blocks along (rows, cols),
    ranks row-major over the blocks, so rank 0 holds chip 0."""

    mesh_shape: tuple
    world: int

    @classmethod
    def of(cls, mesh_shape, world: int) -> "RankLayout":
        layout = cls(tuple(mesh_shape), int(world))
        rows, cols = layout.mesh_shape
        if world < 1 or cols % (world // math.gcd(world, rows)):
            raise ValueError(f"{world} ranks do not cut the {rows}x{cols} mesh into equal blocks "
                             f"(give a divisor of its {rows * cols} chips)")
        return layout

    @property
    def grid(self) -> tuple[int, int]:
        rows_cut = math.gcd(self.world, self.mesh_shape[0])  # rows first: TG's rows, T3K's columns
        return rows_cut, self.world // rows_cut

    @property
    def block(self) -> tuple[int, int]:
        """The leading dimensions each rank holds."""
        return tuple(n // g for n, g in zip(self.mesh_shape, self.grid))

    def origin(self, rank: int) -> tuple[int, int]:
        """The mesh coordinates of `rank`'s first chip."""
        at = divmod(rank, self.grid[1])
        return at[0] * self.block[0], at[1] * self.block[1]

    def chips(self, rank: int) -> list[int]:
        """The global (row-major) numbers of the chips `rank` holds, in its own row-major order."""
        (r0, c0), (br, bc) = self.origin(rank), self.block
        return [(r0 + i) * self.mesh_shape[1] + c0 + j for i in range(br) for j in range(bc)]

    def owner(self, chip: int) -> int:
        r, c = divmod(chip, self.mesh_shape[1])
        return (r // self.block[0]) * self.grid[1] + c // self.block[1]

    def peers(self, rank: int, axis: int) -> list[int]:
        """The ranks whose blocks line up with `rank`'s along mesh `axis`, in mesh order."""
        at = divmod(rank, self.grid[1])
        if axis == 0:
            return [i * self.grid[1] + at[1] for i in range(self.grid[0])]
        return [at[0] * self.grid[1] + j for j in range(self.grid[1])]


class RankGroup:
    """This process's membership of the group: the store, the heartbeat, the gloo group."""

    def __init__(self, config: RankConfig):
        import torch.distributed as dist

        self.config, self.rank, self.world = config, config.rank, config.world_size
        self._dist = dist
        self._barriers: dict[str, int] = {}
        try:
            self.store = self._connect(is_master=not config.store_elsewhere and self.rank == 0)
        except RuntimeError as e:
            raise RankFailure(f"cannot reach the group's store at {config.master_addr}:{config.master_port} "
                              f"({_gist(e)})") from None
        self._stop = threading.Event()
        self._beat_count(self.rank)  # the key exists before the first beat
        self._heart = threading.Thread(target=self._beat, name="ttrun-heartbeat", daemon=True)
        self._heart.start()
        self.barrier("joined", config.join_timeout_s)
        from datetime import timedelta
        try:
            dist.init_process_group("gloo", store=dist.PrefixStore("gloo", self.store), rank=self.rank,
                                    world_size=self.world, timeout=timedelta(seconds=config.timeout_s))
        except RuntimeError as e:
            raise self._failure(e) from None

    # ------------------------------------------------------------------ the store and the heartbeat
    def _connect(self, is_master: bool = False):
        from datetime import timedelta

        c, dist = self.config, self._dist
        store = dist.TCPStore(c.master_addr, c.master_port, c.world_size if is_master else None, is_master,
                              timeout=timedelta(seconds=c.join_timeout_s),
                              wait_for_workers=False)
        return dist.PrefixStore(c.store_prefix, store)

    def _beat(self) -> None:
        """Count up this rank's beat until close(); a lost store ends the thread quietly."""
        try:
            store = self._connect()
            while True:
                store.add(f"beat/{self.rank}", 1)
                if self._stop.wait(self.config.heartbeat_s):
                    return
        except Exception:  # the store is gone: the group is ending anyway
            return

    def _beat_count(self, rank: int) -> int:
        return int(self.store.add(f"beat/{rank}", 0))

    def barrier(self, name: str, limit_s: float | None = None) -> None:
        """Wait until every rank arrives at `name`, for as long as all of them keep beating
        (loading a large program takes as long as it takes); fail naming a rank that stops
        beating, or that has not started within `limit_s`."""
        n = self._barriers[name] = self._barriers.get(name, 0) + 1
        key, start, last = f"barrier/{name}/{n}", time.monotonic(), {}
        try:
            self.store.add(key, 1)
            while int(self.store.add(key, 0)) < self.world:
                now = time.monotonic()
                for r in range(self.world):
                    count = self._beat_count(r)
                    if count != last.get(r, (None,))[0]:
                        last[r] = (count, now)
                missing = [r for r in range(self.world) if last[r][0] == 0 and now - start > (limit_s or math.inf)]
                silent = [r for r in range(self.world)
                          if r != self.rank and last[r][0] and now - last[r][1] > self.config.silence_s]
                if silent:
                    raise self._record(silent, _account(silent, f"while the ranks waited at '{name}'", self.config))
                if missing:
                    raise self._record(missing, f"{_who(missing)} did not start within {limit_s:.0f} s")
                time.sleep(self.config.heartbeat_s / 2)  # world reads per poll: keep the store's load small
        except RuntimeError as e:
            if isinstance(e, RankFailure):
                raise
            raise self._store_lost() from None

    # ------------------------------------------------------------------ collectives
    def _gather(self, x):
        """Every rank's `x` (equal shapes on all ranks), in rank order, bit for bit."""
        import torch

        flat = x.contiguous().reshape(-1).view(torch.uint8)
        out = [torch.empty_like(flat) for _ in range(self.world)]
        try:
            self._dist.all_gather(out, flat)
        except RuntimeError as e:
            raise self._failure(e) from None
        return [o.view(x.dtype).reshape(x.shape) for o in out]

    def full_along(self, x, axis: int, layout: RankLayout):
        """A mesh value with the whole stack along mesh `axis` (the group a collective
        along it sees): `x` itself where this rank holds the axis whole or `x` is the same
        on every chip along it (a leading dimension of 1 in a block longer than one chip;
        in a block of one chip a dimension of 1 may be either, so it is gathered)."""
        import torch

        if layout.grid[axis] == 1 or (x.shape[axis] == 1 and layout.block[axis] > 1):
            return x
        blocks = self._gather(x)
        return torch.cat([blocks[r] for r in layout.peers(self.rank, axis)], dim=axis)

    def host_value(self, x, layout: RankLayout):
        """Chip (0, 0)'s value of mesh value `x` on every rank (what the host reads): local
        when provably the same on every chip along each cut axis, else rank 0's."""
        value = x[0, 0]
        if all(g == 1 or (x.shape[a] == 1 and layout.block[a] > 1) for a, g in enumerate(layout.grid)):
            return value
        import torch

        flat = value.contiguous().reshape(-1).view(torch.uint8).clone()
        try:
            self._dist.broadcast(flat, src=0)
        except RuntimeError as e:
            raise self._failure(e) from None
        return flat.view(value.dtype).reshape(value.shape)

    def shared_seed(self) -> int:
        """A random seed rank 0 draws and every rank reads (host sampling must agree)."""
        import secrets

        try:
            if self.rank == 0:
                self.store.set("seed", str(secrets.randbits(31)))
            return int(self.store.get("seed"))
        except RuntimeError:
            raise self._store_lost() from None

    # ------------------------------------------------------------------ failure
    def _failure(self, error: Exception) -> RankFailure:
        """A collective failed: find the silent ranks (or read another rank's finding)."""
        try:
            self._dist.destroy_process_group()  # our sockets close: peers blocked on us fail at once
        except Exception:
            pass
        try:
            if not self.store.check(["dead"]):
                first = {r: self._beat_count(r) for r in range(self.world)}
                time.sleep(self.config.silence_s)
                silent = [r for r in range(self.world) if r != self.rank and self._beat_count(r) == first[r]]
                return self._record(silent, _account(silent, f"during a collective ({_gist(error)})", self.config))
            return self._record([], "")
        except RuntimeError as e:
            if isinstance(e, RankFailure):
                return e
            return self._store_lost()

    def _record(self, silent: list[int], account: str) -> RankFailure:
        """Store this rank's finding unless another rank's came first; the failure to raise."""
        found = self.store.compare_set("dead", "", ",".join(map(str, silent)) + "|" + account).decode()
        ranks, _, account = found.partition("|")
        dead = {int(r) for r in ranks.split(",") if r}
        self.close(destroy=False)
        return RankFailure(account, report=self.rank == min(set(range(self.world)) - dead, default=self.rank))

    def _store_lost(self) -> RankFailure:
        c = self.config
        self.close(destroy=False)
        if c.store_elsewhere:
            return RankFailure(f"the group's store at {c.master_addr}:{c.master_port} stopped answering "
                               "(the launcher or torchrun's agent ended)")
        return RankFailure("rank 0 stopped answering (it serves the group's store); the other ranks stop",
                           report=self.rank == 1)

    def close(self, destroy: bool = True) -> None:
        """Stop beating and leave the gloo group."""
        self._stop.set()
        if destroy and self._dist.is_initialized():
            self._dist.destroy_process_group()


def _gist(error: Exception) -> str:
    """gloo's message without its source location and advice: 'Connection closed by peer [addr]:port'."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().split("\n")[0])
    return (text.split(". ")[0] or type(error).__name__)[:120]


def _who(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _account(ranks: list[int], when: str, config: RankConfig) -> str:
    """One line: which ranks went silent, and when."""
    if not ranks:
        return (f"a collective failed {when} with every rank still beating "
                f"(a rank slower than the {config.timeout_s:.0f} s timeout?)")
    return f"{_who(ranks)} stopped (no heartbeat for {config.silence_s:.0f} s) {when}; the other ranks stop"
