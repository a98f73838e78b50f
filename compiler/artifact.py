"""Writing the artifact folder and the converted-weight cache, atomically.

OUT/program.json, OUT/manifest.json and the tokenizer files are written to a temporary
sibling and renamed into place; converted weights go to
<cache>/<TARGET>/<key>/ the same way, so an interrupted compile never leaves a folder a
later run mistakes for complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

from .convert import RecipeEvaluator, storage_dtype
from .driver import CompileResult

ARTIFACT_VERSION = 1


def weight_cache_key(source_fingerprint: str, weights: dict) -> str:
    """Everything that changes the converted bytes: the source and each tensor's recipe,
    shape and storage dtype."""
    h = hashlib.sha256(source_fingerprint.encode())
    h.update(json.dumps(weights, sort_keys=True).encode())
    return h.hexdigest()[:24]


def _shard_of(name: str, spec: dict) -> str:
    layer = spec.get("layer")
    return f"layer_{layer:03d}" if layer is not None else "global"


def _mkdtemp(prefix: str, parent: Path) -> Path:
    """A private temporary folder that becomes an ordinary (umask) one once renamed."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place, replacing an older one."""
    old = None
    if final.exists():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert_weights(result: CompileResult, cache_root: Path, progress=None) -> tuple[Path, bool]:
    """Convert and store the program's weights; returns (folder, converted_now)."""
    from safetensors.torch import save_file

    program, reader = result.program, result.reader
    key = weight_cache_key(reader.fingerprint(cache_root / "file-hashes.json"), program.weights)
    final = cache_root / program.target / key
    if (final / "index.json").exists():
        return final, False
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdtemp(f".{key}.", final.parent)
    try:
        evaluate = RecipeEvaluator(reader, result.cfg)
        shards = defaultdict(list)
        for name, spec in program.weights.items():
            shards[_shard_of(name, spec)].append(name)
        index = {}
        items = sorted(shards.items())
        for shard, names in (progress(items) if progress else items):
            tensors = {}
            for name in names:
                spec = program.weights[name]
                t = evaluate(spec["recipe"]).to(storage_dtype(spec["dtype"])).contiguous()
                if list(t.shape) != list(spec["shape"]):
                    raise ValueError(f"weight '{name}': recipe gives {list(t.shape)}, "
                                     f"program expects {spec['shape']}")
                tensors[name] = t
                index[name] = f"{shard}.safetensors"
            save_file(tensors, str(tmp / f"{shard}.safetensors"))
        # index.json last: its presence marks the folder complete.
        (tmp / "index.json").write_text(json.dumps({"weights": index}, indent=1))
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, True


def write_artifact(result: CompileResult, out_dir: Path, model_dir: Path,
                   weights_dir: Path | None, fingerprint: str | None) -> Path:
    from runtime.tokenizer import copy_tokenizer_files

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdtemp(f".{out_dir.name}.", out_dir.parent)
    try:
        (tmp / "program.json").write_text(result.program.dumps())
        if result.precision_file is not None:  # --precision: the per-layer choice, as a precision file
            (tmp / "precision.json").write_text(json.dumps(result.precision_file, indent=1))
        copied = copy_tokenizer_files(model_dir, tmp)
        manifest = {
            "artifact_version": ARTIFACT_VERSION,
            "source": {"path": str(Path(model_dir).resolve()), "fingerprint": fingerprint,
                       "format": result.cfg.source_format},
            "target": result.target.name,
            "mesh_shape": list(result.target.mesh_shape),
            "options": result.program.options,
            "data_parallel": result.program.replicas or None,
            "weights": str(weights_dir) if weights_dir else None,
            "tokenizer_files": copied,
            "versions": _versions(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _versions() -> dict:
    import torch
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        from importlib.metadata import version
        versions["ttcompile"] = version("ttcompile")
    except Exception:
        versions["ttcompile"] = "source"
    return versions
