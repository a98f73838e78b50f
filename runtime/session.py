"""Sessions: a loaded program on a backend, with the host side of generation.

This module never imports torch: the emulator backend does, when it is chosen.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowering.program import Program

from . import schedule
from .generator import generate
from .sampling import device_params
from .stats import Stats

TILE = 32
BACKENDS = ("emulator", "ttnn")
# How the emulator's matmuls form their products: "device" as Wormhole's matrix unit does at
# each op's math fidelity (runtime/emulator/fidelity.py), "exact" with exact products. Both
# accumulate the same deterministic way. A card always multiplies as "device".
MATMULS = {"device": True, "exact": False}  # name -> EmulatorBackend's emulate_fidelity


class ArtifactError(ValueError):
    pass


def read_artifact(path: str | Path) -> tuple[Program, dict]:
    path = Path(path)
    if not (path / "program.json").exists():
        raise ArtifactError(f"{path}: not a ttcompile artifact (no program.json)")
    try:
        program = Program.loads((path / "program.json").read_text())
        manifest = json.loads((path / "manifest.json").read_text())
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ArtifactError(f"{path}: unreadable artifact ({e})") from None
    return program, manifest


def make_backend(program: Program, manifest: dict, backend: str, system: str | None = None,
                 matmul: str = "device", ranks=None):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}' (choose {', '.join(BACKENDS)})")
    if matmul not in MATMULS:
        raise ValueError(f"unknown matmul '{matmul}' (choose {', '.join(MATMULS)})")
    if backend != "emulator" and matmul != "device":
        raise ValueError(f"matmul='{matmul}' is an emulator setting (the {backend} backend multiplies as the device does)")
    weights_dir = manifest.get("weights")
    if weights_dir is None:
        raise ArtifactError("this artifact was compiled with --no-weights; it cannot run")
    if not (Path(weights_dir) / "index.json").exists():
        raise ArtifactError(f"converted weights missing at {weights_dir}; run ttcompile again")
    if ranks is not None and (backend != "emulator" or program.replicas):
        raise ValueError("ranks run the emulator on programs without data-parallel replicas")
    if program.replicas:  # data parallel: a replica on each sub-mesh (runtime/replicas.py)
        if backend == "emulator":
            from .replicas import open_emulator
            return open_emulator(program, Path(weights_dir), system, MATMULS[matmul])
        from .ttnn_backend.replicas import open_replicas
        return open_replicas(program, Path(weights_dir))
    if backend == "emulator":
        from .emulator.backend import EmulatorBackend
        return EmulatorBackend(program, Path(weights_dir), system=system, emulate_fidelity=MATMULS[matmul],
                               ranks=ranks)
    from .ttnn_backend import TtnnBackend  # noqa: F401 (the ttnn backend issue)
    return TtnnBackend(program, Path(weights_dir))


@dataclass
class Session:
    path: Path
    program: Program
    manifest: dict
    backend: object
    stats: Stats = field(default_factory=Stats)
    _tokenizer: object = None
    _pages: object = None
    _images: object = None

    @property
    def max_seq_len(self) -> int:
        return int(self.program.options["max_seq_len"])

    @property
    def batch_size(self) -> int:
        return int(self.program.options["batch_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.program.model["vocab_size"])

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer
            self._tokenizer = Tokenizer.from_dir(self.path)
        return self._tokenizer

    # ------------------------------------------------------------------ primitives
    def _check_length(self, length: int) -> None:
        if length == 0:
            raise ValueError("empty prompt: give at least one token")
        if length >= self.max_seq_len:
            raise ValueError(f"prompt of {length} tokens does not fit max-seq-len {self.max_seq_len} "
                             "(recompile with a larger --max-seq-len or shorten the prompt)")

    @property
    def paged(self) -> bool:
        return any(i.name == "page_table" for i in self.program.functions["decode"].inputs)

    @property
    def max_prefill_chunk(self) -> int:
        return int(self.program.options.get("prefill_chunk") or self.max_seq_len)

    @property
    def pages(self):
        """The KV page allocator (paged programs only), created on first use."""
        if self._pages is None:
            from .pages import PageAllocator
            from .replicas import ReplicaPages
            options, replicas = self.program.options, self.program.replicas
            geometry = (options["max_num_blocks"], options["block_size"], self.max_seq_len // options["block_size"])
            self._pages = (ReplicaPages(replicas["count"], replicas["batch_size"], *geometry) if replicas
                           else PageAllocator(*geometry))  # data parallel: a pool per replica
        return self._pages

    @property
    def images(self):
        """The image side (runtime/image_slots.py): which image each slot holds, and the
        masks of the text functions (disabled for programs without a vision function)."""
        if self._images is None:
            from .image_slots import ImageSlots
            self._images = ImageSlots(self)
        return self._images

    def reset(self) -> None:
        """Forget every user. A paged program only frees its pages: a block is always
        written before it is read, so stale contents are never seen and zeroing a pool of
        gigabytes per request would be wasted work. Contiguous caches are zeroed."""
        if self.paged:
            self.pages.reset()
        else:
            self.backend.reset()
        self.images.reset()

    def prefill(self, token_ids: list[int], user_id: int) -> np.ndarray:
        """Prefill one user (chunk by chunk when the prompt is longer than the largest
        prefill chunk); returns the logits [V] at its last prompt position."""
        self._check_length(len(token_ids))
        rows = min(schedule.prefill_rows(len(token_ids)), self.max_seq_len)
        tokens = np.zeros((1, rows), dtype=np.int64)
        tokens[0, : len(token_ids)] = token_ids
        last = len(token_ids) - 1
        if not self.paged:
            return self._prefill_call(tokens, 0, last, {"user_id": user_id},
                                      self.images.prefill_inputs(user_id, 0, rows))
        block = self.program.options["block_size"]
        self.pages.reserve(user_id, rows)  # the padded rows are written too
        row = self.pages.row(user_id)
        chunk = schedule.prefill_chunk(rows, self.max_prefill_chunk, block)
        for start in range(0, rows, chunk):
            inputs = {"page_table": row[None], "chunk_page_table": row[None, start // block:(start + chunk) // block],
                      **self.images.prefill_inputs(user_id, start, chunk)}
            logits = self._prefill_call(tokens[:, start:start + chunk], start, last,
                                        {"chunk_start": start, "user_id": user_id}, inputs)
            if start <= last < start + chunk:
                result = logits
        return result

    def _prefill_call(self, tokens, start: int, last: int, scalars: dict, inputs: dict | None = None):
        rows = tokens.shape[1]
        local = min(max(last - start, 0), rows - 1)
        tile = (local // TILE) * TILE
        (logits,) = self.backend.run(
            "prefill", {"tokens": tokens, "positions": np.arange(start, start + rows)[None], **(inputs or {})},
            {**scalars, "last_tile_start": tile})
        return logits.reshape(-1, logits.shape[-1])[local - tile, : self.vocab_size]

    @property
    def samples_on_device(self) -> bool:
        """The program's decode ends in sampling (one token id per user leaves the device);
        its "decode_logits" variant returns logits (teacher forcing)."""
        return "decode_logits" in self.program.functions

    def _decode_inputs(self, tokens: np.ndarray, positions: np.ndarray) -> dict:
        inputs = {"tokens": tokens[None], "positions": positions[None], **self.images.decode_inputs(positions)}
        if self.paged:
            inputs["page_table"] = self.pages.table(self.batch_size)
        return inputs

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One decode step for the whole batch: tokens/positions [B] -> logits [B, V].
        A user at position < 0 is inactive: it reads and writes no cache."""
        function = "decode_logits" if self.samples_on_device else "decode"
        (logits,) = self.backend.run(function, self._decode_inputs(tokens, positions))
        return logits.reshape(-1, logits.shape[-1])[: len(tokens), : self.vocab_size]

    def decode_sample(self, tokens: np.ndarray, positions: np.ndarray, temperature: float,
                      top_p: float) -> np.ndarray:
        """One decode step sampled on the device (runtime.sampling.device_params): token
        ids [B]; only they leave the device."""
        params = device_params(temperature, top_p, self.batch_size)
        (ids,) = self.backend.run("decode", {**self._decode_inputs(tokens, positions), **params})
        return ids.reshape(-1)[: len(tokens)].astype(np.int64)

    # ------------------------------------------------------------------ public API
    def teacher_forced_logits(self, token_ids: list[int], prefill_len: int, image=None) -> np.ndarray:
        """Row 0: prefill logits at position prefill_len-1; row i: decode step feeding
        token_ids[prefill_len+i-1] at that position (predicts token_ids[prefill_len+i]).
        `image` (Llama 3.2 Vision programs): the image the prompt's <|image|> token stands for."""
        token_ids = list(token_ids)
        if not 0 < prefill_len <= len(token_ids):
            raise ValueError("prefill_len must be between 1 and len(token_ids)")
        if len(token_ids) > self.max_seq_len:
            raise ValueError(f"{len(token_ids)} tokens exceed max-seq-len {self.max_seq_len}")
        processed = self.images.prepare(token_ids[:prefill_len], image)
        self.reset()
        self.images.load(0, token_ids[:prefill_len], processed)
        if self.paged:
            self.pages.reserve(0, len(token_ids))
        rows = [self.prefill(token_ids[:prefill_len], user_id=0)]
        batch = self.batch_size
        for pos in range(prefill_len, len(token_ids) - 1):
            tokens = np.zeros(batch, dtype=np.int64)
            positions = np.zeros(batch, dtype=np.int64)
            positions[:] = -1  # other users are inactive
            tokens[0], positions[0] = token_ids[pos], pos
            rows.append(self.decode(tokens, positions)[0])
        return np.stack(rows).astype(np.float32)

    def validate(self, **options) -> dict:
        """ttnn backend: replay prefill and decode once through ttnn (on a mock mesh when
        no card is attached) and return a summary: ops issued per function, target, mock
        or real device, DRAM per chip, the largest L1 footprint per op kind."""
        if not hasattr(self.backend, "validate"):
            raise ValueError(f"validate() needs the ttnn backend (this session runs on {self.backend.name})")
        return self.backend.validate(**options)

    def generate(self, prompts, max_generated_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
                 instruct: bool | None = None, on_token=None, images=None) -> list:
        """`images` (Llama 3.2 Vision programs): a list aligned with the prompts, each None,
        a path or a PIL.Image."""
        return generate(self, prompts, max_generated_tokens, temperature, top_p, seed,
                        stop_at_eos, instruct, on_token, images)


def load(path: str | Path, backend: str = "emulator", system: str | None = None,
         warmup: bool | None = None, matmul: str = "device", ranks=None) -> Session:
    """Open an artifact on a backend. `system` names the machine the emulator pretends to
    be (a program for a smaller mesh runs on a sub-mesh of it, as FAKE_DEVICE does).
    `matmul` (emulator): "device" multiplies at each op's math fidelity as Wormhole's
    matrix unit does, "exact" with exact products (MATMULS).
    `warmup`: run every function once before returning (None: on the ttnn backend, whose
    first calls compile kernels; the emulator compiles nothing). Load and warm-up times
    are in `Session.stats`. `ranks` (emulator): a runtime.emulator.ranks.RankGroup; this
    process then holds and runs only its rank's block of the mesh."""
    import time

    start = time.perf_counter()
    program, manifest = read_artifact(path)
    session = Session(Path(path), program, manifest, make_backend(program, manifest, backend, system, matmul, ranks))
    _startup(session, time.perf_counter() - start, warmup)
    return session


def _startup(session: Session, load_s: float, warmup: bool | None) -> None:
    """Record the load in session.stats and run the warm-up (one prefill and one decode
    step: kernel compilation and ttnn's program cache), timed apart from any request."""
    backend, stats = session.backend, session.stats
    weight_load = getattr(backend, "weight_load", None) or {}
    stats.load_s, stats.weights_s = load_s, float(weight_load.get("seconds", 0.0))
    stats.weights_from = weight_load.get("from", "")
    if warmup is None:
        warmup = hasattr(backend, "warm_up")
    if not warmup:
        return
    if not hasattr(backend, "warm_up"):
        raise ValueError(f"the {backend.name} backend compiles nothing: it has no warm-up")
    seconds = backend.warm_up()
    stats.warmup_prefill_s = sum(t for name, t in seconds.items() if not name.startswith("decode"))
    stats.warmup_decode_s = sum(t for name, t in seconds.items() if name.startswith("decode"))
