"""The TTNN ops a program may contain, with their parameter names as ttnn 0.81.1 has them.

Every entry needs an emulator implementation (runtime/emulator/ops.py) and a ttnn
implementation (runtime/ttnn_backend); tests/test_optable.py fails when one is missing.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpDef:
    name: str  # the ttnn attribute path, e.g. "ttnn.experimental.nlp_concat_heads"
    params: tuple[str, ...]  # positional parameters, in order
    kwargs: tuple[str, ...] = ()  # keyword parameters the lowering may pass
    outputs: int = 1  # number of result tensors (0: writes its first input in place)
    collective: bool = False  # reads every chip's tensor along a mesh axis
    doc: str = ""
    # How its rows (decode: users; prefill: positions) depend on each other: "own" (a row
    # of the result from the same row of the inputs only), "causal" (from that row and the
    # rows before it), "" (mixed, or not known). The emulator skips rows by it
    # (runtime/emulator/active_rows.py).
    rows: str = ""




_DEFS = [
    OpDef("ttnn.embedding", ("input_tensor", "weight"), ("layout", "dtype", "memory_config"),
          doc="rows of weight for uint32 ids [1, R] -> [1, R, D]", rows="own"),
    OpDef("ttnn.unsqueeze_to_4D", ("tensor",), doc="prepend 1-dims up to rank 4", rows="own"),
    OpDef("ttnn.transpose", ("input_tensor", "dim1", "dim2"), ("memory_config",), rows="own"),
    OpDef("ttnn.reshape", ("input_tensor", "shape"), ("memory_config",)),
    OpDef("ttnn.slice", ("input_tensor", "slice_start", "slice_end"), ("memory_config",)),
    OpDef("ttnn.typecast", ("input_tensor", "dtype"), ("memory_config",), rows="own"),
    OpDef("ttnn.to_memory_config", ("tensor", "memory_config"), ("dtype",),
          doc="move a tensor to another memory layout (DRAM/L1, interleaved/sharded); same values", rows="own"),
    OpDef("ttnn.rms_norm", ("input_tensor",),
          ("epsilon", "weight", "memory_config", "compute_kernel_config"), rows="own"),
    OpDef("ttnn.linear", ("input_tensor_a", "input_tensor_b"),
          ("bias", "dtype", "memory_config", "compute_kernel_config", "activation"), rows="own"),
    OpDef("ttnn.add", ("input_tensor_a", "input_tensor_b"), ("dtype", "memory_config"), rows="own"),
    OpDef("ttnn.mul", ("input_tensor_a", "input_tensor_b"),
          ("input_tensor_a_activations", "dtype", "memory_config"), rows="own"),
    OpDef("ttnn.silu", ("input_tensor",), ("memory_config",), rows="own"),
    OpDef("ttnn.experimental.nlp_create_qkv_heads", ("input",),
          ("num_heads", "num_kv_heads", "transpose_k_heads", "memory_config"), outputs=3,
          doc="[1, 1, S, (H+2Hkv)hd] -> q [1, H, S, hd], k/v [1, Hkv, S, hd]", rows="own"),
    OpDef("ttnn.experimental.nlp_create_qkv_heads_decode", ("input",),
          ("num_heads", "num_kv_heads", "memory_config"), outputs=3,
          doc="[1, 1, B, (H+2Hkv)hd] -> q [1, B, H, hd], k/v [1, B, Hkv, hd] (heads tile-padded)", rows="own"),
    OpDef("ttnn.experimental.rotary_embedding_llama",
          ("input_tensor", "cos_cache", "sin_cache", "trans_mat"),
          ("is_decode_mode", "memory_config", "compute_kernel_config"),
          doc="x * cos + (x @ trans_mat) * sin per 32-wide tile; interleaved pairs", rows="own"),
    OpDef("ttnn.fill_cache", ("cache_tensor", "input_tensor", "batch_idx"), outputs=0,
          doc="cache[batch_idx, :, :S] = input[0] (in place)"),
    OpDef("ttnn.experimental.paged_update_cache", ("cache_tensor", "input_tensor"),
          ("update_idxs_tensor", "page_table"), outputs=0,
          doc="cache[b, :, update_idxs[b]] = input[0, b] (in place, repacks to cache dtype)", rows="own"),
    OpDef("ttnn.experimental.paged_fill_cache", ("cache_tensor", "input_tensor", "page_table"),
          ("batch_idx",), outputs=0,
          doc="cache[page_table[batch_idx, j]] = input[0, :, j*bs:(j+1)*bs] (in place, raw tile copy)", rows="own"),
    OpDef("ttnn.transformer.chunked_scaled_dot_product_attention",
          ("input_tensor_q", "input_tensor_k", "input_tensor_v", "page_table_tensor", "chunk_start_idx"),
          ("scale", "compute_kernel_config", "program_config", "memory_config", "sliding_window_size"),
          doc="q rows at chunk_start.. attend causally to the user's paged K/V up to chunk_start+S", rows="causal"),
    OpDef("ttnn.transformer.paged_scaled_dot_product_attention_decode",
          ("input_tensor_q", "input_tensor_k", "input_tensor_v"),
          ("page_table_tensor", "cur_pos_tensor", "scale", "compute_kernel_config", "program_config",
           "memory_config", "sliding_window_size"),
          doc="user b attends to its paged positions 0..cur_pos[b] (cur_pos < 0: inactive)", rows="own"),
    OpDef("ttnn.transformer.scaled_dot_product_attention",
          ("input_tensor_q", "input_tensor_k", "input_tensor_v"),
          ("is_causal", "scale", "compute_kernel_config", "program_config", "memory_config",
           "sliding_window_size", "attn_mask")),
    OpDef("ttnn.transformer.scaled_dot_product_attention_decode",
          ("input_tensor_q", "input_tensor_k", "input_tensor_v"),
          ("cur_pos_tensor", "scale", "compute_kernel_config", "program_config", "memory_config",
           "sliding_window_size", "attn_mask", "is_causal")),
    OpDef("ttnn.experimental.nlp_concat_heads", ("input_tensor",), ("memory_config",), rows="own"),
    OpDef("ttnn.all_reduce", ("input_tensor",),
          ("cluster_axis", "num_links", "memory_config", "topology"), collective=True,
          doc="sum over the chips of mesh axis cluster_axis; every chip gets the sum", rows="own"),
    OpDef("ttnn.all_gather", ("input_tensor", "dim"),
          ("cluster_axis", "num_links", "memory_config", "topology"), collective=True,
          doc="concatenate the chips' tensors along dim over mesh axis cluster_axis", rows="own"),
    OpDef("ttnn.experimental.nlp_concat_heads_decode", ("input_tensor",),
          ("num_heads", "memory_config"), rows="own"),
    # Llama 3.2 Vision (lowering/vision_rules.py)
    OpDef("ttnn.layer_norm", ("input_tensor",),
          ("epsilon", "weight", "bias", "memory_config", "compute_kernel_config")),
    OpDef("ttnn.gelu", ("input_tensor",), ("memory_config",), doc="exact (erf) GELU"),
    OpDef("ttnn.concat", ("tensors", "dim"), ("memory_config",), doc="join a list of tensors along dim"),
    OpDef("ttnn.permute", ("input_tensor", "dims"), ("memory_config",)),
    OpDef("ttnn.to_layout", ("tensor", "layout"), ("dtype", "memory_config"), doc="TILE <-> ROW_MAJOR; same values",
          rows="own"),
    OpDef("ttnn.pad", ("input_tensor", "padding", "value"), ("memory_config",),
          doc="padding: a (before, after) pair per dim, filled with value"),
    OpDef("ttnn.repeat", ("input_tensor", "repetition_vector"), ("memory_config",),
          doc="tile the tensor repetition_vector[d] times along each dim d"),
    # Sampling on the device (lowering/sampling.py)
    OpDef("ttnn.topk", ("input_tensor", "k"), ("dim", "largest", "sorted", "memory_config"), outputs=2,
          doc="the k largest values along dim, sorted, and their indices (ties: lower index first)", rows="own"),
    OpDef("ttnn.sampling", ("input_values_tensor", "input_indices_tensor"), ("k", "p", "temp", "seed"),
          doc="per user: top-k of the sorted candidates, x temp, softmax, smallest prefix of mass > p, a draw; "
              "returns input_indices at the drawn position, [1, 1, 1, users] uint32", rows="own"),
]

OPS: dict[str, OpDef] = {d.name: d for d in _DEFS}


def check_op(name: str, args: list, kwargs: dict) -> None:
    """Raise ValueError if a program op does not match the table."""
    d = OPS.get(name)
    if d is None:
        raise ValueError(f"unknown op {name}")
    if len(args) != len(d.params):
        raise ValueError(f"{name}: {len(args)} positional arguments, expected {d.params}")
    unknown = set(kwargs) - set(d.kwargs)
    if unknown:
        raise ValueError(f"{name}: unknown keyword arguments {sorted(unknown)}")
