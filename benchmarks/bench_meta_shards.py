"""Peak memory while converting a multi-shard Meta checkpoint, against its size.

    .venv/bin/python benchmarks/bench_meta_shards.py [--gb 3] [--shards 4] [--keep DIR]

Builds a synthetic Llama-3-shaped Meta checkpoint (params.json + consolidated.NN.pth,
bfloat16, split over --shards model-parallel files as Meta's 70B layout is) of about
--gb GB in a temporary folder, then runs what `ttcompile DIR --target N150` runs (compile,
convert the weights layer by layer into the cache) in a child process that samples its
own memory. Prints, against the checkpoint size and its largest tensor:
- peak anonymous RSS (memory the process allocated: tensors being converted),
- peak file-backed RSS (checkpoint pages mapped by mmap: MetaReader drops each tensor's
  pages once it is copied out, or they would add up to the whole checkpoint),
- VmHWM (the kernel's peak RSS, both together).
The shards are read through mmap and concatenated one tensor at a time (MetaReader); the
conversion holds one layer's converted tensors at a time (compiler/artifact.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1 << 30


def _shape_for(total_gb: float) -> dict:
    """Llama-3-8B-wide layers, as many as make about total_gb of bfloat16."""
    dim, ffn, heads, kv, vocab = 4096, 14336, 32, 8, 32768
    per_layer = 2 * (2 * dim * dim + 2 * dim * (kv * dim // heads) + 3 * dim * ffn)
    layers = max(1, round((total_gb * GB - 2 * 2 * vocab * dim) / per_layer))
    return {"dim": dim, "n_layers": layers, "n_heads": heads, "n_kv_heads": kv, "vocab_size": vocab,
            "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0,
            "use_scaled_rope": False, "max_seq_len": 4096}


def build_checkpoint(folder: Path, params: dict, shards: int) -> tuple[int, int]:
    """Write params.json and the shards, one at a time (this process never holds the model)."""
    import torch

    from models_ref.config import meta_ffn_dim
    from models_ref.weights import _meta_shard_dim

    d, hd = params["dim"], params["dim"] // params["n_heads"]
    ffn = meta_ffn_dim(d, params["multiple_of"], params["ffn_dim_multiplier"])
    shapes = {"tok_embeddings.weight": (params["vocab_size"], d), "norm.weight": (d,),
              "output.weight": (params["vocab_size"], d)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        shapes.update({p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
                       p + "attention.wq.weight": (d, d), p + "attention.wk.weight": (params["n_kv_heads"] * hd, d),
                       p + "attention.wv.weight": (params["n_kv_heads"] * hd, d), p + "attention.wo.weight": (d, d),
                       p + "feed_forward.w1.weight": (ffn, d), p + "feed_forward.w3.weight": (ffn, d),
                       p + "feed_forward.w2.weight": (d, ffn)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    gen = torch.Generator().manual_seed(0)
    total, largest = 0, 0
    for s in range(shards):
        part = {}
        for name, shape in shapes.items():
            dim = _meta_shard_dim(name)
            local = list(shape)
            if dim is not None:
                local[dim] //= shards
            part[name] = (torch.randn(local, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            total += part[name].numel() * 2
            largest = max(largest, math.prod(shape) * 2)
        torch.save(part, folder / f"consolidated.{s:02d}.pth")
        del part
    return total, largest


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def child(model: Path, cache: Path, out: Path) -> None:
    """Compile + convert in this process, sampling memory every 20 ms."""
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            st = _status()
            for k in peaks:
                peaks[k] = max(peaks[k], st[k])
            time.sleep(0.02)

    sys.path.insert(0, str(ROOT))
    from compiler import artifact
    from compiler.driver import compile_model
    from compiler.options import CompileOptions

    baseline = _status()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    result = compile_model(model, CompileOptions(target="N150", cache_dir=cache, max_seq_len=4096))
    weights_dir, _ = artifact.convert_weights(result, cache)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    final = _status()
    print(json.dumps({"baseline": baseline, "peaks": peaks, "VmHWM": final["VmHWM"], "seconds": seconds,
                      "converted_bytes": sum(f.stat().st_size for f in weights_dir.glob("*.safetensors"))}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.0, help="checkpoint size to build (GB)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--keep", help="build (or reuse) the checkpoint here instead of a temp folder")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*(Path(a) for a in args.child))
        return 0
    sys.path.insert(0, str(ROOT))
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="meta-shards-"))
    model, cache = root / "checkpoint", root / "cache"
    try:
        params = _shape_for(args.gb)
        start = time.perf_counter()
        if not (model / "params.json").exists():
            size, largest = build_checkpoint(model, params, args.shards)
        else:
            size = sum(f.stat().st_size for f in model.glob("consolidated.*.pth"))
            largest = params["vocab_size"] * params["dim"] * 2
        print(f"checkpoint: {params['n_layers']} layers of dim {params['dim']}, {args.shards} shards, "
              f"{size / GB:.2f} GB; largest tensor {largest / 2**20:.0f} MB "
              f"(built in {time.perf_counter() - start:.0f} s)")
        shutil.rmtree(cache, ignore_errors=True)
        proc = subprocess.run([sys.executable, __file__, "--child", str(model), str(cache), str(root / "out")],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        base, peaks = data["baseline"], data["peaks"]
        anon = peaks["RssAnon"] - base["RssAnon"]
        print(f"converted {data['converted_bytes'] / GB:.2f} GB in {data['seconds']:.0f} s")
        print(f"peak anonymous RSS above start-up: {anon / 2**20:7.0f} MB = {anon / size:.2f} x checkpoint, "
              f"{anon / largest:.1f} x largest tensor")
        mapped = peaks["RssFile"] - base["RssFile"]
        print(f"peak file-backed RSS above start-up (mmap'd shards): {mapped / 2**20:7.0f} MB "
              f"= {mapped / size:.2f} x checkpoint")
        print(f"VmHWM (peak RSS, both): {data['VmHWM'] / 2**20:7.0f} MB = {data['VmHWM'] / size:.2f} x checkpoint; "
              f"start-up RSS {base['VmRSS'] / 2**20:.0f} MB")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
