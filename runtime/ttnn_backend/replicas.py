"""A data-parallel program on ttnn: the system's mesh opened once, carved into sub-meshes
(ttnn's MeshDevice.create_submeshes), one TtnnBackend of the replica program on each.

Program.replicas (compiler/data_parallel.py) says how: `submesh_shape` is cut from the
system's mesh and reshaped to the replica's `mesh_shape` when they differ (a TG's 8x1
columns become 1x8 T3K meshes, as the reference's create_submeshes does). Checked on
ttnn 0.81.1's mock T3K (4 x 1x2, 8 x 1x1) and TG (4 x 8x1 as 1x8, 16 x 1x2, 32 x 1x1).
The replicas load their weights in turn: the first writes the ttnn weight files of the
replica program (they are keyed by the replica's mesh shape, weight_files.py), the others
read them. Torch-free.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

from runtime.replicas import Replicated

from . import mock
from .backend import TtnnBackend, TtnnBackendError, check_supported, open_mesh, ttnn_message


class ReplicatedTtnn(Replicated):
    """Replicated (runtime/replicas.py) with what the ttnn backend adds: warm-up,
    validation, and closing the system's mesh."""

    def __init__(self, program, replicas: list, ttnn, mesh, mode: mock.DeviceMode):
        super().__init__(program, replicas)
        self.ttnn, self.mesh, self.mode = ttnn, mesh, mode

    def warm_up(self, *args, **kwargs) -> dict[str, float]:
        """Every replica's warm-up (validate.py); seconds per function, summed."""
        seconds: Counter = Counter()
        for replica in self.replicas:
            seconds.update(replica.warm_up(*args, **kwargs))
        return dict(seconds)

    def validate(self, *args, **kwargs) -> dict:
        """Every replica's validation summary (TtnnBackend.validate) under "replicas", and
        the whole: ok when every replica is; ops issued per function summed over them."""
        summaries = [replica.validate(*args, **kwargs) for replica in self.replicas]
        functions = {}
        for name in summaries[0]["functions"]:
            functions[name] = {key: sum(s["functions"][name][key] for s in summaries)
                               for key in ("ops_issued", "ops_in_program")}
        replicas = self.program.replicas
        return {"target": replicas["system"], "mesh_shape": list(replicas["system_mesh_shape"]),
                "device": "mock" if self.mode.mock else "real", "cluster_descriptor": self.mode.cluster_descriptor,
                "replica_target": self.program.target, "replica_mesh_shape": list(self.program.mesh_shape),
                "submesh_shape": list(replicas["submesh_shape"]),
                "submeshes": [list(r.mesh.shape) for r in self.replicas], "weight_load": self.weight_load,
                "functions": functions, "replicas": summaries, "ok": all(s["ok"] for s in summaries)}

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()  # frees its tensors; the sub-mesh goes with the system's mesh
        if self.mesh is not None:
            self.ttnn.close_mesh_device(self.mesh)
            self.mesh = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass


def open_submeshes(ttnn, mesh, replicas: dict) -> list:
    """The replicas' sub-meshes of the open system `mesh`, each of the replica's shape."""
    submeshes = mesh.create_submeshes(ttnn.MeshShape(*replicas["submesh_shape"]))
    if len(submeshes) != replicas["count"]:
        raise TtnnBackendError(f"ttnn carved {len(submeshes)} sub-meshes of {replicas['submesh_shape']} from the "
                               f"{replicas['system']} mesh, the program has {replicas['count']} replicas")
    for submesh in submeshes:
        if list(submesh.shape) != list(replicas["mesh_shape"]):
            submesh.reshape(ttnn.MeshShape(*replicas["mesh_shape"]))
    return submeshes


def open_replicas(program, weights_dir: Path | None, weights: dict | None = None,
                  quiet: bool = False) -> ReplicatedTtnn:
    """The program's replicas on the system's mesh (the card, or the system's mock cluster).
    `weights_dir` None and `weights` None: weights allocated on the device (weight-free)."""
    check_supported(program)
    replicas = program.replicas
    mode = mock.configure(replicas["system"], quiet=quiet)
    try:
        import ttnn  # after mock.configure: ttnn reads the environment when a device opens
    except ModuleNotFoundError as e:
        if e.name != "ttnn":
            raise
        raise mock.TtnnNotInstalled() from None
    mesh = open_mesh(ttnn, mode, replicas["system_mesh_shape"])
    backends = []
    try:
        try:
            submeshes = open_submeshes(ttnn, mesh, replicas)
        except RuntimeError as e:  # ttnn's own refusal to carve or reshape
            raise TtnnBackendError(f"carving {replicas['count']} sub-meshes of {replicas['submesh_shape']} from the "
                                   f"{replicas['system']} mesh failed:\n  {ttnn_message(e)}") from None
        view = program.replica_program()
        start = time.perf_counter()
        for submesh in submeshes:
            backends.append(TtnnBackend(view, weights_dir, weights=weights, quiet=True, mesh=submesh))
        if not quiet:
            print(f"ttnn backend: {len(backends)} replicas of the {view.target} program on "
                  f"{'x'.join(map(str, replicas['submesh_shape']))} sub-meshes of the {mode.describe()} "
                  f"({time.perf_counter() - start:.1f} s to place them)", file=sys.stderr)
    except BaseException:
        for backend in backends:
            backend.close()
        ttnn.close_mesh_device(mesh)
        raise
    return ReplicatedTtnn(program, backends, ttnn, mesh, mode)


def open_backend(program, weights_dir: Path | None, weights: dict | None = None, quiet: bool = False):
    """A TtnnBackend for a program, or the replicas of a data-parallel one."""
    if program.replicas:
        return open_replicas(program, weights_dir, weights, quiet)
    return TtnnBackend(program, weights_dir, weights=weights, quiet=quiet)
