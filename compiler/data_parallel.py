"""Data parallel: one program replicated on equal sub-meshes of a system, users split over them.

`ttcompile --target T3K --data-parallel 4` compiles one replica program for the sub-mesh
(an N300: the T3K's 8 chips as 4 sub-meshes of 2) with batch_size / 4 users, and records
where the replicas go (Program.replicas, `to_json` below). The runtime opens the whole
system, carves the sub-meshes and runs one replica on each, with its share of the users
(runtime/replicas.py); the memory plan and --report are per replica.

The replica's target is read off the target table: the row of the system's architecture
with num_chips / N chips (T3K / 4 -> N300, T3K / 8 -> N150, TG / 4 -> T3K, TG / 16 ->
N300, TG / 32 -> N150, P150X4 / 2 -> P300). The sub-mesh carved from the system's mesh is
that row's mesh shape when it tiles the system's mesh, else its transpose, which ttnn
reshapes to the row's shape (a TG's 8x1 columns as 1x8 T3Ks, as the reference's
create_submeshes does for a Galaxy). A count that does not divide the chips, or whose
sub-mesh no target row describes, is refused with the counts that work.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import CompileError
from .options import BATCH_SIZES, CompileOptions
from .targets import TARGETS, Target


@dataclass(frozen=True)
class ReplicaLayout:
    """`count` replicas of a `replica`-target program on `system`, each on a sub-mesh of
    `submesh_shape` carved from the system's mesh (reshaped to replica.mesh_shape when
    the two differ)."""

    system: Target
    replica: Target
    count: int
    submesh_shape: tuple[int, int]

    def describe(self) -> str:
        return (f"--data-parallel {self.count} on {self.system.name} ({_shape(self.system.mesh_shape)}): each "
                f"replica is an {self.replica.name} ({_shape(self.submesh_shape)} sub-mesh)")

    def replica_options(self, options: CompileOptions) -> CompileOptions:
        """The options one replica is compiled with: its target, its share of the users."""
        return options.replace(target=self.replica.name, batch_size=options.batch_size // self.count,
                               data_parallel=1)

    def to_json(self, replica_batch: int) -> dict:
        """Program.replicas: what the runtime needs to place the replicas."""
        return {"count": self.count, "system": self.system.name, "system_mesh_shape": list(self.system.mesh_shape),
                "submesh_shape": list(self.submesh_shape), "mesh_shape": list(self.replica.mesh_shape),
                "batch_size": replica_batch}


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def replica_target(system: Target, count: int) -> Target | None:
    """The target row a 1/count share of `system` is: same architecture, num_chips / count
    chips, a mesh that can be carved from the system's (None: there is none)."""
    if count < 1 or system.num_chips % count:
        return None
    chips = system.num_chips // count
    for row in TARGETS.values():
        if row.supported and row.arch == system.arch and row.num_chips == chips and _carve(system, row):
            return row
    return None


def _carve(system: Target, replica: Target) -> tuple[int, int] | None:
    """The sub-mesh shape to cut from the system's mesh: the replica's shape, or its
    transpose (reshaped by ttnn), whichever tiles the system's mesh first."""
    rows, cols = system.mesh_shape
    for shape in (replica.mesh_shape, replica.mesh_shape[::-1]):
        if rows % shape[0] == 0 and cols % shape[1] == 0:
            return tuple(shape)
    return None


def choices(system: Target) -> dict[int, str]:
    """Every --data-parallel count the system takes -> the replica's target."""
    out = {}
    for count in range(1, system.num_chips + 1):
        row = replica_target(system, count)
        if row is not None:
            out[count] = row.name
    return out


def replica_layout(options: CompileOptions) -> ReplicaLayout | None:
    """The layout of options.data_parallel replicas on options.target (None for 1).
    Refuses, with the counts that work, a count that does not divide the system's chips or
    whose sub-mesh no target describes."""
    if options.data_parallel == 1:
        return None
    from .targets import get_target

    system = get_target(options.target)
    count = options.data_parallel
    replica = replica_target(system, count)
    if replica is None:
        works = ", ".join(f"{n} ({name})" for n, name in choices(system).items())
        if system.num_chips % count:
            why = f"{count} replicas do not divide its {system.num_chips} chip{'s' if system.num_chips > 1 else ''}"
        else:
            why = (f"no {system.arch} target is a {system.num_chips // count}-chip sub-mesh of it "
                   f"(targets are compiler/targets.py's rows)")
        raise CompileError(f"--data-parallel {count} on {system.name} ({_shape(system.mesh_shape)}): {why}; "
                           f"it takes --data-parallel {works}")
    _check_replica_batch(options.batch_size, count)
    return ReplicaLayout(system, replica, count, _carve(system, replica))


def _check_replica_batch(batch_size: int, replicas: int) -> None:
    """Every replica serves batch_size / replicas users, one of BATCH_SIZES. (The
    reference's demo counts its batch per replica instead: its batch 32 with
    data_parallel 4 is --batch-size 128 --data-parallel 4 here.)"""
    per_replica, rest = divmod(batch_size, replicas)
    if rest or per_replica not in BATCH_SIZES:
        choices_ = ", ".join(str(b * replicas) for b in BATCH_SIZES)
        raise CompileError(
            f"--batch-size {batch_size} does not split over {replicas} replicas into one of {BATCH_SIZES} users "
            f"each (--batch-size counts the users of every replica: choose one of {choices_})")
