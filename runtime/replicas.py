"""Data-parallel programs on a backend: N replicas of one program, each on its own sub-mesh,
each serving its share of the users (compiler/data_parallel.py compiles and places them).

User u of the whole batch is user u % b of replica u // b (b: each replica's batch,
Program.replicas["batch_size"]). `Replicated` answers the backend calls a session, the
generator and the engine make, as one backend over all the users:
- a call with a `user_id` scalar (prefill chunks, Llama 3.2 Vision's image) runs on that
  user's replica, with the user's number there;
- any other call (a decode step) gives every replica its users' slice of each per-user
  input (USER_DIM: tokens, positions, page-table rows, sampling parameters, cross-attention
  masks) and joins the replicas' outputs in user order. A replica none of whose users is
  active (every position < 0) is not run: its users' outputs are zeros (an inactive
  user's output is never read, and it reads and writes no cache).
A page-table entry is a block of the pool of the user's replica: every replica has its own
pool of max-num-blocks blocks (ReplicaPages hands them out per replica).

Torch-free: the replicas themselves come from `open_emulator` here (which imports the
emulator) or runtime/ttnn_backend/replicas.py.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from .pages import PageAllocator

# Per-call input source -> the dim that counts users in a decode call: tokens and
# positions [1, B], page table [B, blocks], sampling parameters [B], Llama 3.2 Vision's
# cross-attention rows [1, 1, B, L] and row mask [1, 1, B, 1]. (The ttnn backend pads
# these to a tile of users along the same dims.)
USER_DIM = {"tokens": -1, "positions": -1, "page_table": 0, "xattn_mask": -2, "row_mask": -2,
            "sample_k": 0, "sample_p": 0, "sample_temp": 0}


class Replicated:
    """One backend over the users of `replicas` (backends of the same replica program,
    Program.replica_program(), each on its own sub-mesh)."""

    def __init__(self, program, replicas: list):
        if len(replicas) != program.replicas["count"]:
            raise ValueError(f"{len(replicas)} replicas for a program of {program.replicas['count']}")
        self.program = program
        self.replicas = replicas
        self.users_per_replica = int(program.replicas["batch_size"])
        self.system = program.replicas["system"]

    @property
    def name(self) -> str:
        return self.replicas[0].name

    def replica_of(self, user: int) -> tuple[int, int]:
        """(replica, its user number) of user `user` of the whole batch."""
        replica, local = divmod(int(user), self.users_per_replica)
        if not 0 <= replica < len(self.replicas):
            raise ValueError(f"user {user} is not one of the program's {len(self.replicas) * self.users_per_replica} "
                             f"({len(self.replicas)} replicas x {self.users_per_replica})")
        return replica, local

    # ------------------------------------------------------------------ execution
    def run(self, fn_name: str, inputs: dict[str, np.ndarray], scalars: dict | None = None) -> list[np.ndarray]:
        scalars = scalars or {}
        if "user_id" in scalars:  # one user's call: on its replica
            replica, local = self.replica_of(scalars["user_id"])
            return self.replicas[replica].run(fn_name, inputs, {**scalars, "user_id": local})
        shares = {r: self.replicas[r].run(fn_name, self._share(inputs, r), scalars) for r in self._busy(inputs)}
        idle = [np.zeros_like(out) for out in next(iter(shares.values()))]  # every user inactive: not run
        return [self._join([shares[r][i] if r in shares else idle[i] for r in range(len(self.replicas))])
                for i in range(len(idle))]

    def _busy(self, inputs: dict[str, np.ndarray]) -> list[int]:
        """The replicas a batch call runs on: those with an active user (position >= 0),
        or all when the call has no positions (at least one: the outputs' shapes)."""
        if "positions" not in inputs:
            return list(range(len(self.replicas)))
        positions = np.asarray(inputs["positions"]).reshape(-1)
        if len(positions) != len(self.replicas) * self.users_per_replica:
            return list(range(len(self.replicas)))  # _share says what is wrong
        busy = np.flatnonzero((positions >= 0).reshape(len(self.replicas), -1).any(axis=1)).tolist()
        return busy or [0]

    def _share(self, inputs: dict[str, np.ndarray], replica: int) -> dict[str, np.ndarray]:
        """Replica `replica`'s users of every per-user input (the others whole)."""
        b, out = self.users_per_replica, {}
        for source, array in inputs.items():
            dim = USER_DIM.get(source)
            array = np.asarray(array)
            if dim is None:
                out[source] = array
                continue
            if array.shape[dim] != b * len(self.replicas):
                raise ValueError(f"input '{source}' has {array.shape[dim]} users; the program takes "
                                 f"{len(self.replicas)} replicas x {b}")
            out[source] = np.take(array, np.arange(replica * b, (replica + 1) * b), axis=dim)
        return out

    def _join(self, outputs: list[np.ndarray]) -> np.ndarray:
        """The replicas' outputs of a batch call in user order: along the users' dim, rows
        (logits [.., B, V]) or, when rows are not users, columns (sampled ids [.., 1, B])."""
        b, shape = self.users_per_replica, outputs[0].shape
        axis = -2 if len(shape) > 1 and shape[-2] == b else -1
        if shape[axis] != b:
            raise ValueError(f"a replica's output {list(shape)} has no dim of its {b} users")
        return np.concatenate(outputs, axis=axis)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        for replica in self.replicas:
            replica.reset()

    def seed_sampling(self, seeds) -> None:
        """Each replica's users' seeds (user u's seed seeds its sampling wherever it runs)."""
        seeds, b = list(seeds), self.users_per_replica
        for r, replica in enumerate(self.replicas):
            replica.seed_sampling(seeds[r * b:(r + 1) * b] or [0])

    def zero_state_rows(self, names, row: int) -> None:
        replica, local = self.replica_of(row)
        self.replicas[replica].zero_state_rows(names, local)

    # ------------------------------------------------------------------ counters
    def _counted(self, name: str) -> Counter:
        total = Counter()
        for replica in self.replicas:
            total.update(getattr(replica, name, Counter()))
        return total

    @property
    def ops_executed(self) -> Counter:
        return self._counted("ops_executed")

    @property
    def invocations(self) -> Counter:
        """Calls of each function, counted per replica (a decode step of 4 replicas is 4)."""
        return self._counted("invocations")

    @property
    def collectives_executed(self) -> Counter:
        return self._counted("collectives_executed")

    @property
    def weight_load(self) -> dict:
        """The first replica's weight load, with the seconds of all of them."""
        loads = [getattr(r, "weight_load", None) or {} for r in self.replicas]
        return {**loads[0], "seconds": round(sum(float(w.get("seconds", 0.0)) for w in loads), 3),
                "replicas": loads}


class ReplicaPages:
    """A page pool per replica (PageAllocator's interface): user u's blocks come from the
    pool of its replica, and its page-table row holds block numbers of that pool.
    `num_blocks` is one pool's size: the generator, which groups users so that their
    blocks fit `num_blocks` together, then never over-fills a replica."""

    def __init__(self, replicas: int, users_per_replica: int, num_blocks: int, block_size: int,
                 blocks_per_user: int):
        self.users_per_replica = users_per_replica
        self.pools = [PageAllocator(num_blocks, block_size, blocks_per_user, seed=r) for r in range(replicas)]
        self.num_blocks, self.block_size, self.blocks_per_user = num_blocks, block_size, blocks_per_user

    def _pool(self, user: int) -> tuple[PageAllocator, int]:
        replica, local = divmod(int(user), self.users_per_replica)
        return self.pools[replica], local

    def reset(self) -> None:
        for pool in self.pools:
            pool.reset()

    @property
    def free_blocks(self) -> int:
        """Blocks free in the fullest pool (what any user can count on)."""
        return min(pool.free_blocks for pool in self.pools)

    def blocks_for(self, tokens: int) -> int:
        return self.pools[0].blocks_for(tokens)

    def fits(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= min(self.free_blocks, self.blocks_per_user)

    def reserve(self, user: int, tokens: int) -> list[int]:
        pool, local = self._pool(user)
        return pool.reserve(local, tokens)

    def release(self, user: int) -> None:
        pool, local = self._pool(user)
        pool.release(local)

    def row(self, user: int) -> np.ndarray:
        pool, local = self._pool(user)
        return pool.row(local)

    def table(self, users: int) -> np.ndarray:
        return np.stack([self.row(u) for u in range(users)])


def open_emulator(program, weights_dir: Path, system: str | None = None,
                  emulate_fidelity: bool = True) -> Replicated:
    """The replicas of a data-parallel program on the emulator: one EmulatorBackend on the
    replica's mesh, then copies of it that share its weights (read-only) with their own
    state. `system` (optional) must hold the program's system; `emulate_fidelity` as
    EmulatorBackend's."""
    from compiler.targets import TARGETS

    from .emulator.backend import EmulatorBackend

    if system is not None:
        host, needed = TARGETS.get(system.upper()), TARGETS[program.replicas["system"]]
        if host is None:
            raise ValueError(f"unknown system '{system}' (choose {', '.join(TARGETS)})")
        if not host.holds(needed):
            raise ValueError(f"a {needed.name} program ({program.replicas['count']} replicas) does not fit a "
                             f"{host.name} system (mesh {list(host.mesh_shape)})")
    first = EmulatorBackend(program.replica_program(), weights_dir, emulate_fidelity=emulate_fidelity)
    return Replicated(program, [first] + [first.another_replica() for _ in range(program.replicas["count"] - 1)])
