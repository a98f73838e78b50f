"""The vLLM model interface over a compiled program: the methods Tenstorrent's vLLM fork
calls on tt-metal's generator classes (models/tt_transformers/tt/generator_vllm.py,
tech_reports/LLMs/vLLM_integration.md):

    initialize_vllm_model(hf_config, mesh_device, max_batch_size, max_seq_len, ...)  (classmethod)
    allocate_kv_cache(kv_cache_shape, dtype, num_layers)
    prefill_forward(tokens, page_table, kv_cache, prompt_lens)        -> logits [B, 1, V]
    decode_forward(tokens, start_pos, page_table, kv_cache, enable_trace, read_from_device,
                   sampling_params)                                   -> logits [B, 1, V] (or tokens)
    read_decode_output(tt_out, unpadded_batch, is_tokens)             -> logits [B, 1, V] on the host

vLLM's block manager owns the pages: every call brings its page tables, and this class
never allocates a block. The device calls are runtime/engine.py's, the same ones ttserve's
scheduler makes, so vLLM and ttserve give the same tokens for the same requests.

The KV cache is the program's own: `allocate_kv_cache` checks that vLLM's cache shape is
one the program addresses ((blocks, KV heads, block size, head dim) within the compiled
pool) and returns a handle per layer (K and V) to the program's cache state, in the
reference's nesting `kv_cache[data_parallel_group][layer] = [k, v]`; vLLM passes it back to
every call, and a cache this model did not allocate is refused.

Which program: `TTCompiledForCausalLM.for_program(OUT)` is a class bound to an artifact
(register that class), or a vLLM config carrying `tt_program` (vLLM's
`--hf-overrides '{"tt_program": "OUT"}'`). The backend: `for_program(OUT, backend=...)` or
`tt_backend` in the config, else the emulator when vLLM gives no mesh device and ttnn when
it does. The backend opens the mesh the program was compiled for itself.

Torch is not imported here: arrays come in as torch tensors or numpy arrays, and results
go back as the same kind.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engine import Engine, EngineError, Sampler, next_tokens


@dataclass(frozen=True)
class KVCacheTensor:
    """A handle to one of the program's cache tensors (a state of the program)."""

    name: str
    shape: tuple
    dtype: str


@dataclass
class DecodeOutput:
    """decode_forward's result before it is read to the host (read_from_device=False)."""

    values: np.ndarray  # [batch, V] logits, or [batch] token ids
    is_tokens: bool
    like: object = None  # an input array: results are returned as its kind (torch or numpy)


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _like(array: np.ndarray, like):
    """`array` as a torch tensor when `like` is one (vLLM's case), else numpy."""
    if type(like).__module__.split(".")[0] == "torch":
        import torch
        return torch.from_numpy(np.ascontiguousarray(array))
    return array


class TTCompiledForCausalLM:
    """A compiled program as a vLLM model (text generation)."""

    model_capabilities = {"supports_prefix_caching": False}
    program: str | None = None  # bound by for_program
    backend: str | None = None

    def __init__(self, session, max_batch_size: int | None = None):
        self.session = session
        self.engine = Engine(session)
        self.max_batch_size = max_batch_size or session.batch_size
        self.kv_cache = None

    @classmethod
    def for_program(cls, program, backend: str | None = None) -> type:
        """A subclass bound to the artifact `program` (register it with vLLM's ModelRegistry)."""
        return type(cls.__name__, (cls,), {"program": str(program), "backend": backend,
                                           "__module__": cls.__module__, "__qualname__": cls.__qualname__})

    # ------------------------------------------------------------------ vLLM: loading
    @classmethod
    def initialize_vllm_model(cls, hf_config, mesh_device, max_batch_size, max_seq_len=None, n_layers=None,
                              tt_data_parallel=1, optimizations=None, **_ignored):
        import runtime

        program = cls.program or getattr(hf_config, "tt_program", None)
        if program is None or not (Path(program) / "program.json").is_file():
            raise ValueError("no compiled program: register TTCompiledForCausalLM.for_program(OUT), or give vLLM "
                             "--hf-overrides '{\"tt_program\": \"OUT\"}' (OUT: a ttcompile artifact)")
        backend = cls.backend or getattr(hf_config, "tt_backend", None) or \
            ("emulator" if mesh_device is None else "ttnn")
        session = runtime.load(program, backend=backend)
        _check_config(session, hf_config)
        if max_batch_size > session.batch_size:
            raise ValueError(f"vLLM's max_num_seqs {max_batch_size} exceeds the program's {session.batch_size} "
                             f"decode slots (recompile with --batch-size {max_batch_size})")
        if max_seq_len is not None and max_seq_len > session.max_seq_len:
            raise ValueError(f"vLLM's max_model_len {max_seq_len} exceeds the program's context "
                             f"{session.max_seq_len} (recompile with --max-seq-len {max_seq_len})")
        if n_layers not in (None, session.program.model["n_layers"]):
            raise ValueError(f"n_layers={n_layers}: the program has {session.program.model['n_layers']} layers "
                             "(compile a model with fewer layers instead)")
        if tt_data_parallel != 1:
            raise ValueError("tt_data_parallel must be 1 (compile with --data-parallel for replicas)")
        compiled = session.program.options.get("optimizations")
        if optimizations not in (None, compiled):
            raise ValueError(f"optimizations='{optimizations}': the program was compiled with '{compiled}' "
                             f"(recompile with --optimizations {optimizations})")
        return cls(session, max_batch_size)

    @property
    def cache_path(self) -> Path:
        return self.session.path

    def allocate_kv_cache(self, kv_cache_shape, dtype, num_layers):
        """Handles to the program's K and V caches, one pair per layer, for a cache of
        `kv_cache_shape` = (blocks, KV heads, block size, head dim). The program's cache
        dtype is used whatever `dtype` says (it was chosen at compile time)."""
        blocks, heads, block_size, head_dim = (int(d) for d in kv_cache_shape)
        model, engine = self.session.program.model, self.engine
        layers = int(model["n_layers"])
        if num_layers != layers:
            raise ValueError(f"num_layers={num_layers}: the program has {layers} layers")
        if block_size != engine.block_size:
            raise ValueError(f"block size {block_size}: the program was compiled for {engine.block_size} "
                             f"(give vLLM --block-size {engine.block_size})")
        if head_dim != int(model["head_dim"]):
            raise ValueError(f"head size {head_dim}: the model's is {model['head_dim']}")
        if blocks > engine.num_blocks:
            raise ValueError(f"a cache of {blocks} blocks exceeds the program's pool of {engine.num_blocks} "
                             f"(recompile with --max-num-blocks {blocks}, or give vLLM "
                             f"--num-gpu-blocks-override {engine.num_blocks})")
        state = self.session.program.state
        caches = []
        for layer in range(layers):
            pair = []
            for kind in ("k", "v"):
                name = f"layers.{layer}.attention.{kind}_cache"
                spec = state[name]
                if heads not in (int(model["n_kv_heads"]), int(spec.shape[1])):
                    raise ValueError(f"{heads} KV heads: the model has {model['n_kv_heads']}")
                pair.append(KVCacheTensor(name, tuple(spec.shape), spec.dtype))
            caches.append(pair)
        self.session.backend.reset()  # a fresh, zeroed cache
        self.session.images.reset()
        self.kv_cache = [caches]
        return self.kv_cache

    def warmup_model_prefill(self, kv_cache=None, enable_trace=False, **_ignored) -> None:
        """Newer vLLM calls this once the cache exists: nothing is left to do
        (runtime.load warms the ttnn backend up; the emulator compiles nothing)."""
        self._check_cache(kv_cache)

    def warmup_model_decode(self, kv_cache=None, enable_trace=False, **_ignored) -> None:
        """As warmup_model_prefill."""
        self._check_cache(kv_cache)

    # ------------------------------------------------------------------ vLLM: running
    def prefill_forward(self, tokens, page_table=None, kv_cache=None, prompt_lens=None, empty_slots=None,
                        **_ignored):
        """Prefill each row of `tokens` [B, S] (zero-padded to the longest prompt) to its
        prompt_lens[b], through its page-table row [B, blocks] (vLLM's, zero-padded; it
        must hold blocks for the prompt); returns the logits at each last prompt position
        [B, 1, V]. `empty_slots`: the decode slots the users take (programs with per-slot
        state); by default 0..B-1."""
        self._check_cache(kv_cache)
        ids, table = _numpy(tokens).astype(np.int64), self._table(page_table, "prefill_forward")
        batch = ids.shape[0]
        lengths = [ids.shape[1]] * batch if prompt_lens is None else [int(n) for n in _numpy(prompt_lens)]
        slots = list(range(batch)) if empty_slots is None else [int(s) for s in empty_slots]
        out = np.zeros((batch, 1, self.engine.vocab_size), dtype=np.float32)
        for b in range(batch):
            prompt = ids[b, : lengths[b]].tolist()
            needed = -(-lengths[b] // self.engine.block_size)
            if table.shape[1] < needed:
                raise EngineError(f"prefill_forward: user {b}'s page table has {table.shape[1]} blocks, its prompt of "
                                  f"{lengths[b]} tokens needs {needed}")
            self.session.images.load(slots[b], prompt, None)  # text only (vision programs: no image)
            out[b, 0] = self.engine.prefill(prompt, self.engine.table_row(table[b]), slots[b])
        return _like(out, tokens)

    def decode_forward(self, tokens, start_pos, page_table=None, kv_cache=None, enable_trace=True,
                       read_from_device=True, sampling_params=None, **_ignored):
        """One decode step: tokens [B, 1] at positions start_pos [B] (-1: a padding row,
        inactive), page table [B, blocks]. Logits [B, 1, V], or with `sampling_params`
        (temperature 0, as the reference) the greedy token ids [B, 1]. `enable_trace` has
        no meaning here (each step is one program invocation)."""
        self._check_cache(kv_cache)
        ids = _numpy(tokens).astype(np.int64).reshape(-1)
        positions = _numpy(start_pos).astype(np.int64).reshape(-1)
        table = self._table(page_table, "decode_forward")
        batch, slots = len(ids), self.engine.batch_size
        if batch > slots or len(positions) != batch or table.shape[0] != batch:
            raise EngineError(f"decode_forward: {batch} tokens, {len(positions)} positions and a page table of "
                              f"{table.shape[0]} rows for a program of {slots} decode slots")
        all_tokens, all_positions = np.zeros(slots, dtype=np.int64), np.full(slots, -1, dtype=np.int64)
        all_tokens[:batch], all_positions[:batch] = ids, positions
        rows = np.zeros((slots, self.engine.blocks_per_user), dtype=np.int64)
        for b in range(batch):
            if positions[b] >= 0:
                rows[b] = self.engine.table_row(table[b])
        logits = self.engine.decode(all_tokens, all_positions, rows)[:batch]
        if sampling_params is not None:
            temperature = getattr(sampling_params, "temperature", 0)
            if np.any(np.asarray(temperature) != 0):
                raise ValueError("decode_forward samples only greedily (sampling_params.temperature 0); "
                                 "leave sampling_params None to sample on the host")
            output = DecodeOutput(next_tokens(logits, [Sampler()] * batch), True, tokens)
        else:
            output = DecodeOutput(logits, False, tokens)
        return self.read_decode_output(output, batch, output.is_tokens) if read_from_device else output

    def read_decode_output(self, tt_out: DecodeOutput, unpadded_batch=None, is_tokens=False, async_read=False):
        """decode_forward's output on the host: logits [B, 1, V] or token ids [B, 1], the
        first `unpadded_batch` rows. With async_read (newer vLLM): (output, [])."""
        batch = len(tt_out.values) if unpadded_batch is None else int(unpadded_batch)
        values = tt_out.values[:batch]
        host = _like(values.reshape(batch, 1) if tt_out.is_tokens else values[:, None, :], tt_out.like)
        return (host, []) if async_read else host

    def process_decode_output_host(self, tt_out, is_tokens=False):
        """Newer vLLM: the host form of a decode output (read_decode_output's)."""
        return tt_out if not isinstance(tt_out, DecodeOutput) else self.read_decode_output(tt_out)

    # ------------------------------------------------------------------ checks
    def _check_cache(self, kv_cache) -> None:
        if self.kv_cache is None:
            raise ValueError("call allocate_kv_cache before prefill_forward / decode_forward")
        if kv_cache is not None and kv_cache is not self.kv_cache:
            raise ValueError("kv_cache was not allocated by this model's allocate_kv_cache")

    @staticmethod
    def _table(page_table, what: str) -> np.ndarray:
        if page_table is None:
            raise EngineError(f"{what} needs a page table (the program's KV cache is paged)")
        table = _numpy(page_table).astype(np.int64)
        if table.ndim != 2:
            raise EngineError(f"{what}: the page table must be [batch, blocks], got shape {list(table.shape)}")
        return table


def _check_config(session, hf_config) -> None:
    """vLLM's model config must describe the compiled model."""
    config = getattr(hf_config, "text_config", None) or hf_config
    model = session.program.model
    for field_name, key in (("vocab_size", "vocab_size"), ("num_hidden_layers", "n_layers"),
                            ("hidden_size", "dim")):
        value = getattr(config, field_name, None)
        if value is not None and int(value) != int(model[key]):
            raise ValueError(f"vLLM's model config says {field_name}={value}, the compiled program has "
                             f"{model[key]}: point vLLM at the model the program was compiled from")
