"""Llama 3.2 Vision, one image through the 11B's vision tower: emulator vs HF eager bf16.

The compiled program's vision function on the emulator and Hugging Face eager (bfloat16),
side by side in one run, on the 11B's real vision geometry.

    .venv/bin/python benchmarks/bench_vision.py [--cache DIR] [--rounds N] [--tiles-crop]
                                                [--optimizations performance accuracy]

The checkpoint (built once into DIR/model, random weights, bfloat16) has the 11B's vision
tower (hidden 1280, 32 local + 8 global layers, 16 heads, 560-pixel tiles, up to 4 tiles,
taps [3, 7, 15, 23, 30], vision_output_dim 7680, from models_ref/seed_configs) and a small
text decoder (hidden 512, 4 layers, cross-attention at HF layers 1 and 3, vocabulary 1000),
so the figures are those of the vision tower. It is compiled with the real CLI
(`ttcompile ... --target N150 --optimizations MODE`, performance unless --optimizations
says otherwise) into DIR/program-<mode>, converted weights in DIR/weights.

What it prints (figures and ratios, no assertions; a shared 2-core machine is noisy, so the
contenders alternate over --rounds rounds and the median of each is reported):
- seconds per image of the emulator's vision function (backend.run("vision") as
  runtime/image_slots.py calls it; preprocessing excluded) and of HF's
  vision_model + multi_modal_projector on the same preprocessed photo (matplotlib's
  grace_hopper.jpg, 512x600: 2 tiles; --tiles-crop: a 400x400 crop, 1 tile), the ratio
  emulator / HF (above 1: the emulator is slower), and how much each call grew the
  process's resident memory at its peak (sampled every 0.1 s);
- time to first token of session.generate([prompt with <|image|>], images=[photo],
  max_generated_tokens=1), split into the vision function and the prefill function;
- the op count of each program function and the memory plan's bytes per chip by category.

Both HF and the emulator run every one of the max_num_tiles (4) tiles whatever the image's
aspect ratio (padding tiles are masked, not skipped), so the photo's tile count changes the
masks, not the work; --tiles-crop times a crop that fits one tile to show it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SEED_CONFIG = ROOT / "models_ref" / "seed_configs" / "llama3.2-11b-vision" / "config.json"
VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_global_layers", "attention_heads",
               "image_size", "patch_size", "max_num_tiles", "intermediate_layers_indices", "vision_output_dim",
               "num_channels", "norm_eps", "hidden_act", "supported_aspect_ratios")
TEXT = dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=128, intermediate_size=1024,
            vocab_size=1000, num_hidden_layers=4, cross_attention_layers=[1, 3], rms_norm_eps=1e-5,
            max_position_embeddings=2048, rope_theta=500000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False)
IMAGE = 1000  # <|image|>: the first row after the vocabulary
PROMPT = [1, 5, IMAGE, 7, 8, 9, 10, 11, 12, 13]
TILE = 560


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- checkpoint and programs
def ensure_checkpoint(folder: Path) -> Path:
    if (folder / "config.json").exists():
        return folder
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    seed = json.loads(SEED_CONFIG.read_text())["vision_config"]
    vision = {k: seed[k] for k in VISION_KEYS}
    log(f"building the checkpoint in {folder} (vision tower of the 11B, small text decoder)")
    torch.manual_seed(0)
    config = MllamaConfig(text_config=TEXT, vision_config=vision, image_token_index=IMAGE)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"(^|\.)gate(_attn|_ffn)?$|_gate$", name):
                p.fill_(1.0)
            elif re.search(r"norm(_pre|_post)?\.weight$", name):
                p.normal_(1.0, 0.02)
            else:
                p.normal_(0.0, 0.02)
    model = model.to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def ensure_program(cache: Path, model: Path, mode: str) -> tuple[Path, float | None]:
    out = cache / f"program-{mode}"
    if (out / "program.json").exists():
        return out, None
    ttcompile = Path(sys.executable).parent / "ttcompile"
    command = [str(ttcompile), str(model), "--target", "N150", "--optimizations", mode, "-o", str(out),
               "--cache", str(cache / "weights"), "--max-seq-len", "1024", "--max-num-blocks", "64", "-q"]
    log("compiling: " + " ".join(command))
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return out, time.perf_counter() - start


def photo(tiles_crop: bool):
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    image = Image.open(path).convert("RGB")
    return image.crop((0, 0, 400, 400)) if tiles_crop else image


# ---------------------------------------------------------------------- contenders
class PeakRss:
    """`with PeakRss() as peak:` ... `peak.growth`: the largest resident-set size seen during
    the block (sampled every 0.1 s) minus the size at its start, in bytes."""

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        self.growth = self.peak - self.start


class Timed:
    """Wraps session.backend.run on the instance: seconds of each call per function name."""

    def __init__(self, backend):
        self.calls: dict[str, list[float]] = {}
        inner = backend.run

        def run(fn_name, *args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(fn_name, *args, **kwargs)
            finally:
                self.calls.setdefault(fn_name, []).append(time.perf_counter() - start)
        backend.run = run

    def take(self) -> dict[str, float]:
        out = {k: sum(v) for k, v in self.calls.items()}
        self.calls.clear()
        return out


def emulator_vision(session, timed: Timed, processed) -> tuple[float, int]:
    session.reset()
    timed.take()
    with PeakRss() as peak:
        session.images.load(0, PROMPT, processed)
    return timed.take()["vision"], peak.growth


def hf_vision(model, processed) -> tuple[float, int]:
    inputs = dict(pixel_values=torch.tensor(processed.pixel_values)[None, None].to(torch.bfloat16),
                  aspect_ratio_ids=torch.tensor([[processed.aspect_ratio_id]]),
                  aspect_ratio_mask=torch.tensor(processed.aspect_ratio_mask)[None, None])
    with torch.inference_mode(), PeakRss() as peak:
        start = time.perf_counter()
        states = model.model.vision_model(**inputs).last_hidden_state
        model.model.multi_modal_projector(states)
        seconds = time.perf_counter() - start
    return seconds, peak.growth


def ttft(session, timed: Timed, image) -> dict[str, float]:
    timed.take()
    session.generate([PROMPT], max_generated_tokens=1, images=[image], stop_at_eos=False)
    calls = timed.take()
    return {"ttft": session.stats.time_to_first_token_s, "vision": calls.get("vision", 0.0),
            "prefill": calls.get("prefill", 0.0)}


# ---------------------------------------------------------------------- report
def mib(n: float) -> str:
    return f"{n / 2 ** 20:10.1f} MiB"


def print_program(out: Path) -> None:
    data = json.loads((out / "program.json").read_text())
    counts = {name: len(fn["ops"]) for name, fn in data["functions"].items()}
    print("  ops per function: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    summary = data["memory_plan"]["summary"]
    print(f"  memory plan per chip ({data['target']}), total {mib(summary['total_bytes_per_chip']).strip()}:")
    for category, n in summary["bytes_per_chip"].items():
        print(f"    {category:22s} {mib(n)}")


def s(x: float) -> str:
    return f"{x:8.2f} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path("/tmp/bench_vision"),
                   help="checkpoint, converted weights and programs (built once, then reused)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tiles-crop", action="store_true", help="a 400x400 crop of the photo (one tile)")
    p.add_argument("--optimizations", nargs="+", default=["performance"], choices=["performance", "accuracy"],
                   help="modes to compile and time (each keeps its weights loaded: ~2 GB)")
    args = p.parse_args()
    import runtime
    from runtime.images import ImageConfig, preprocess
    from transformers import MllamaForConditionalGeneration

    args.cache.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_checkpoint(args.cache / "model")
    modes = list(dict.fromkeys(args.optimizations))
    programs = {mode: ensure_program(args.cache, model_dir, mode) for mode in modes}
    image = photo(args.tiles_crop)
    processed = preprocess(image, ImageConfig(tile_size=TILE, max_tiles=4))
    hf = MllamaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    sessions = {}
    for mode, (out, _) in programs.items():
        start = time.perf_counter()
        session = runtime.load(out)
        sessions[mode] = (session, Timed(session.backend))
        log(f"loaded {out.name} in {time.perf_counter() - start:.1f} s")

    emulator = {mode: [] for mode in modes}
    baseline = []
    for r in range(args.rounds):
        for mode, (session, timed) in sessions.items():
            emulator[mode].append(emulator_vision(session, timed, processed))
            log(f"round {r + 1}: emulator {mode} vision {emulator[mode][-1][0]:.2f} s")
        baseline.append(hf_vision(hf, processed))
        log(f"round {r + 1}: HF vision {baseline[-1][0]:.2f} s")
    first = {}
    for mode, (session, timed) in sessions.items():
        first[mode] = ttft(session, timed, image)
        log(f"time to first token ({mode}) {first[mode]['ttft']:.2f} s")

    def figures(runs):
        seconds = [x for x, _ in runs]
        return statistics.median(seconds), seconds, max(g for _, g in runs)

    b, b_rounds, b_mem = figures(baseline)
    print("Llama 3.2 Vision image encoding, 11B vision tower (1280 wide, 32+8 layers, 16 heads), "
          "small text side (512 wide, 4 layers)")
    print(f"photo {image.size[0]}x{image.size[1]} -> {processed.num_tiles} tile(s) {processed.aspect_ratio} "
          f"of {TILE} px (all 4 tiles computed by both), median of {args.rounds}, "
          f"torch threads {torch.get_num_threads()}")
    for mode in modes:
        out, seconds = programs[mode]
        e, e_rounds, e_mem = figures(emulator[mode])
        compiled = f", compiled in {seconds:.1f} s" if seconds is not None else ", reused"
        print(f"  emulator vision function ({out.name}{compiled}):")
        print(f"    {s(e)} per image   rounds {[round(x, 2) for x in e_rounds]}   "
              f"peak memory growth {e_mem / 2 ** 30:.2f} GiB")
        print(f"    ratio emulator / HF: {e / b:6.2f}x time, {e_mem / max(b_mem, 1):6.2f}x peak memory growth")
    print("  HF eager bf16 vision_model + multi_modal_projector:")
    print(f"    {s(b)} per image   rounds {[round(x, 2) for x in b_rounds]}   "
          f"peak memory growth {b_mem / 2 ** 30:.2f} GiB")
    for mode in modes:
        t = first[mode]
        print(f"  time to first token with the photo ({mode}, {len(PROMPT)}-token prompt): {s(t['ttft'])}"
              f"  = vision function {t['vision']:.2f} s + prefill function {t['prefill']:.2f} s"
              f" + host {t['ttft'] - t['vision'] - t['prefill']:.2f} s")
    for mode in modes:
        print(f"{programs[mode][0].name}:")
        print_program(programs[mode][0])


if __name__ == "__main__":
    main()
