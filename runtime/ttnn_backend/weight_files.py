"""ttnn's own tensor files of a program's weights: converted once per system, read later.

The first load of a program converts every device tensor of its weights on the host
(tilized, block-float packed, split into each chip's part: `placement.host_tensor`) and
writes it with `ttnn.dump_tensor` next to the converted-weight cache entry it came from:

    <weights dir>/ttnn/<key>/manifest.json       written last: the entry's table of contents
    <weights dir>/ttnn/<key>/00000.tensorbin ...  one file per device tensor (a weight, or a
                                                  copy an op wants placed otherwise: PER_USER,
                                                  TILE_ROW); a replicated part is stored once

Later loads read them with `ttnn.load_tensor(file, device=mesh)`: no safetensors read, no
host conversion. Both calls take ttnn tensors, so this works without torch (ttnn's
`as_tensor(cache_file_name=...)` would need a torch tensor).

The key hashes everything that changes the bytes: the program's weight table (each
weight's shape, dtype, layout, placement and recipe), the device tensors the backend
places (variants and their shapes), the converted-weight cache entry (its folder key,
index and shard sizes and times), the mesh shape, ttnn's version and this module's
FORMAT. A different program, checkpoint or ttnn version gets its own entry.

Crash safety: an entry is written into a private temporary folder (`.tmp-<key>-<host>-<pid>-*`)
and renamed into place after its manifest, so a load killed half way leaves only a
temporary folder, which no load reads (and a later writer on the same host deletes once
its process is gone). A reader trusts a folder only with its manifest, every file of the
size the manifest records, and every tensor loaded with the shape, dtype and layout it
expects; anything else is reported once and the entry is rewritten.

This module never imports ttnn: the backend passes it in.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from ..files import pid_alive

FORMAT = 1  # bump when what a file holds or how the key is formed changes
SUBDIR = "ttnn"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"


class EntryError(RuntimeError):
    """A weight-file entry that cannot be trusted (incomplete, truncated, or not what the
    program expects)."""


def ttnn_version() -> str:
    """The installed ttnn's version (its package metadata), read without importing it."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("ttnn")
    except PackageNotFoundError:
        return "unknown"


def converted_identity(weights_dir: Path) -> dict:
    """What identifies a converted-weight cache entry's bytes: its folder key (a hash of
    the checkpoint's fingerprint and every recipe, shape and dtype), its index, and the
    size and modification time of each shard (a rewritten shard makes a new key)."""
    weights_dir = Path(weights_dir)
    index = (weights_dir / "index.json").read_bytes()
    shards = sorted(set(json.loads(index)["weights"].values()))
    files = {}
    for shard in shards:
        st = (weights_dir / shard).stat()
        files[shard] = [st.st_size, st.st_mtime_ns]
    return {"entry": weights_dir.name, "index": hashlib.sha256(index).hexdigest(), "files": files}


def entry_key(weight_table: dict, tensors: dict, converted: dict, mesh_shape, version: str) -> str:
    """The key of an entry: a hash of everything that changes the bytes of its files."""
    description = {"format": FORMAT, "ttnn": version, "mesh_shape": list(mesh_shape), "weights": weight_table,
                   "tensors": tensors, "converted": converted}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


def _describe(tensor) -> dict:
    """One chip's shape, the dtype and layout of a ttnn tensor, named as programs name them."""
    return {"shape": [int(d) for d in tensor.shape], "dtype": str(tensor.dtype).split(".")[-1].lower(),
            "layout": str(tensor.layout).split(".")[-1]}


class WeightFiles:
    """The entry of one program's weights on one mesh, under `<weights dir>/ttnn/`."""

    def __init__(self, weights_dir: Path, key: str):
        self.root = Path(weights_dir) / SUBDIR
        self.key = key
        self.path = self.root / key

    def complete(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def reader(self, ttnn) -> "EntryReader":
        return EntryReader(ttnn, self.path)

    def writer(self, ttnn) -> "EntryWriter | None":
        """A writer of this entry, or None (with one line on stderr) when the folder cannot
        be written (a read-only cache): the load then goes on converting on the host."""
        try:
            return EntryWriter(ttnn, self.root, self.key)
        except OSError as e:
            print(f"ttnn backend: cannot write ttnn weight files under {self.root} ({e}); "
                  "weights are converted on the host at every load", file=sys.stderr)
            return None


class EntryReader:
    def __init__(self, ttnn, path: Path):
        self.ttnn, self.path = ttnn, path
        try:
            self.manifest = json.loads((path / MANIFEST).read_text())
            self.tensors = self.manifest["tensors"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EntryError(f"unreadable manifest ({e})") from None
        if (self.manifest.get("format"), self.manifest.get("key")) != (FORMAT, path.name):
            raise EntryError(f"the manifest is of format {self.manifest.get('format')} and key "
                             f"{self.manifest.get('key')}, not {FORMAT} and {path.name}")
        for name, info in self.tensors.items():  # a truncated or missing file: not trusted
            file = path / info["file"]
            size = file.stat().st_size if file.is_file() else None
            if size != info["bytes"]:
                raise EntryError(f"{info['file']} ({name}) has {size} bytes, the manifest says {info['bytes']}")
        self.files_read = 0

    def load(self, name: str, mesh, expected: dict):
        """Device tensor `name`, read straight onto the mesh (DRAM); checked against what
        the program expects (`expected`: one chip's shape, dtype, layout)."""
        info = self.tensors.get(name)
        if info is None:
            raise EntryError(f"no file for '{name}'")
        try:
            tensor = self.ttnn.load_tensor(self.path / info["file"], device=mesh)
        except Exception as e:  # noqa: BLE001 (ttnn raises RuntimeError)
            raise EntryError(f"ttnn.load_tensor({info['file']}) for '{name}' failed: "
                             f"{str(e).split('backtrace:')[0].strip()}") from None
        got = _describe(tensor)
        if got != expected or len(self.ttnn.get_device_tensors(tensor)) != mesh.get_num_devices():
            raise EntryError(f"'{name}' read as {got} on {len(self.ttnn.get_device_tensors(tensor))} chips, "
                             f"the program expects {expected} on {mesh.get_num_devices()}")
        self.files_read += 1
        return tensor


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete temporary folders of writers on this host whose process is gone (a load
    killed half way); returns them."""
    host = socket.gethostname()
    removed = []
    for tmp in root.glob(TMP_PREFIX + "*"):
        parts = tmp.name[len(TMP_PREFIX):].split("-")
        # .tmp-<key>-<host>-<pid>-<random>; host names may contain dashes
        if len(parts) < 4 or not parts[-2].isdigit() or "-".join(parts[1:-2]) != host:
            continue
        if not pid_alive(int(parts[-2])):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


class EntryWriter:
    """Writes an entry into a temporary folder; `commit()` writes the manifest and renames
    the folder into place (replacing an entry that was not trusted); `abort()` removes it."""

    def __init__(self, ttnn, root: Path, key: str):
        self.ttnn, self.root, self.key = ttnn, root, key
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(root)
        prefix = f"{TMP_PREFIX}{key}-{socket.gethostname()}-{os.getpid()}-"
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        umask = os.umask(0)
        os.umask(umask)
        self.tmp.chmod(0o777 & ~umask)
        self.tensors: dict[str, dict] = {}

    @property
    def files_written(self) -> int:
        return len(self.tensors)

    def save(self, name: str, host_tensor, placement: dict | None) -> None:
        """Write one device tensor's host form (each chip's part, converted)."""
        file = f"{len(self.tensors):05d}.tensorbin"
        self.ttnn.dump_tensor(self.tmp / file, host_tensor)
        self.tensors[name] = {"file": file, "bytes": (self.tmp / file).stat().st_size,
                              **_describe(host_tensor), "placement": placement}

    def commit(self, replace: bool = False) -> Path:
        """Complete the entry and put it in place. An entry already there is kept when it
        is complete (another load wrote it meanwhile), unless `replace` (the reader did not
        trust it); a folder without a manifest there is replaced."""
        final = self.root / self.key
        manifest = {"format": FORMAT, "key": self.key, "tensors": self.tensors}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks it complete
        old = None
        if final.exists() and (replace or not (final / MANIFEST).is_file()):
            old = final.with_name(f"{TMP_PREFIX}{self.key}-{socket.gethostname()}-{os.getpid()}-old")
            final.rename(old)
        try:
            self.tmp.rename(final)
        except OSError:  # another load put a complete entry there first: keep it
            if not (final / MANIFEST).is_file():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
