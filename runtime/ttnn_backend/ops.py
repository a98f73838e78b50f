"""The ttnn implementation of every op in lowering.optable: one function per op.

Each function receives an `OpCall` (the ttnn module, the mesh, the program op, what its
consumers want) and the op's arguments: tensor references replaced by device tensors,
host scalars resolved, program literals (dtype names, compute-kernel dicts, activation
names, memory kinds) converted to ttnn objects by `convert_kwargs`.

What is purely how ttnn wants to receive a tensor is decided here, from the program's
shapes: memory configs and shard specs (decode ops work on one user per core, so their
per-user tensors are height-sharded in L1 over the user cores), and the replication of
constants per user. Two mechanisms keep that visible and cheap:
- `WANTS[op](op) -> {parameter: memory kind}`: what an op needs its inputs in. The backend
  asks the producer of such an input to write it there directly (`OpCall.out_memory`) when
  the producer can (`PRODUCES_SHARDED`), so no extra step is needed;
- `OpCall.receive(tensor, kind)`: inside an op, the tensor in the memory it needs. When it
  is not there already, the move is made and recorded: validate() lists every such move,
  as they are steps the program itself should contain.
- `WEIGHT_PLACEMENTS[op](op) -> {parameter: PER_USER | TILE_ROW}`: weights an op reads as
  the backend places them at load, not as the program does (same values): PER_USER, once
  per decode user (the decode RoPE matrix); TILE_ROW, a norm gamma too wide for ttnn's
  row-major gamma kernels as one TILE row (`weight_variant` says which weights qualify).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TILE = 32
USER_SHARDED = "L1_HEIGHT_SHARDED"  # decode: one user's rows per core, in L1
TTNN_OPS: dict = {}
WANTS: dict = {}  # op name -> fn(program op) -> {parameter name: memory kind}
PRODUCES_SHARDED: set = set()  # ops that can write their output height-sharded directly
PER_USER = "per_user"  # a constant placed once per decode user, height-sharded (weights only)
TILE_ROW = "tile_row"  # a ROW_MAJOR [.., W/32, 32] norm gamma placed as one TILE row [1, 1, 1, W]
WEIGHT_PLACEMENTS: dict = {}  # op name -> fn(program op) -> {parameter name: PER_USER | TILE_ROW}
# ttnn 0.81.1's interleaved rms_norm keeps a ROW_MAJOR gamma whole in a circular buffer
# beside the row's tiles: measured on the mock (any rows; bf16 or bf8 input), 4096 wide
# fits a core's L1 (1.43 MB), 5120 does not with fp32_dest_acc_en (1.51 MB), 8192 does not
# at all (2.30 MB; 1.77 MB without fp32 accumulation). With a TILE gamma it streams the
# row in blocks ("large tensor" kernels) and fits at any width (8192: 446 KB per core).
ROW_MAJOR_GAMMA_MAX_WIDTH = 4096


def ttnn_op(name: str, wants=None, produces_sharded: bool = False, weights=None):
    def register(fn):
        TTNN_OPS[name] = fn
        if wants is not None:
            WANTS[name] = wants
        if produces_sharded:
            PRODUCES_SHARDED.add(name)
        if weights is not None:
            WEIGHT_PLACEMENTS[name] = weights
        return fn
    return register


def pad_tile(n: int) -> int:
    return -(-n // TILE) * TILE


@dataclass
class OpCall:
    ttnn: object  # the ttnn module
    mesh: object  # the MeshDevice
    op: object  # lowering.program.Op
    users: int  # users per chip on the device: decode batches are whole tiles of users
    out_memory: list = field(default_factory=list)  # a memory kind per output, or None
    moves: list = field(default_factory=list)  # (operand, from, to) moves made by receive

    def dtype(self, name: str):
        return dtype_of(self.ttnn, name)

    # -------------------------------------------------------------- memory configs
    def user_grid(self, users: int | None = None):
        """The cores decode ops put one user each on: the first `users` cores, row-major."""
        grid = self.mesh.compute_with_storage_grid_size()
        return self.ttnn.num_cores_to_corerangeset(users or self.users, grid, True)

    def height_sharded(self, grid, shard_shape):
        ttnn = self.ttnn
        return ttnn.MemoryConfig(ttnn.TensorMemoryLayout.HEIGHT_SHARDED, ttnn.BufferType.L1,
                                 ttnn.ShardSpec(grid, list(shard_shape), ttnn.ShardOrientation.ROW_MAJOR))

    def memory(self, kind, shape):
        """The MemoryConfig of memory kind `kind` for a device tensor of logical `shape`."""
        ttnn = self.ttnn
        if kind is None or not isinstance(kind, str):
            return kind  # None, or already a MemoryConfig
        if kind == "DRAM":
            return ttnn.DRAM_MEMORY_CONFIG
        if kind == "L1":
            return ttnn.L1_MEMORY_CONFIG
        if kind == USER_SHARDED:  # [.., users, rows, width]: one user's tile rows per core
            shape = list(shape)
            return self.height_sharded(self.user_grid(shape[-3]), (pad_tile(shape[-2]), pad_tile(shape[-1])))
        raise ValueError(f"unknown memory kind '{kind}'")

    def output_memory(self, index: int, shape, given=None):
        """The memory config for output `index`: the program's, else what consumers want."""
        if given is not None:
            return self.memory(given, shape)
        kind = self.out_memory[index] if index < len(self.out_memory) else None
        return self.memory(kind, shape) if kind else None

    def receive(self, tensor, memory_config, what: str):
        """`tensor` in `memory_config`, moved there if it is not: a step the program does
        not contain, recorded in `moves` so that validate() reports it."""
        if tensor.memory_config() == memory_config:
            return tensor
        self.moves.append((what, describe_memory(tensor.memory_config()), describe_memory(memory_config)))
        return self.ttnn.to_memory_config(tensor, memory_config)


def describe_memory(mem) -> str:
    layout = str(mem.memory_layout).split(".")[-1].split("::")[-1]
    where = f"{str(mem.buffer_type).split('.')[-1].split('::')[-1]} {layout}"
    if mem.shard_spec is not None:
        where += f" shard {list(mem.shard_spec.shape)} on {mem.shard_spec.num_cores()} cores"
    return where


# ------------------------------------------------------------------ conversions
def dtype_of(ttnn, name: str):
    return {"bfloat16": ttnn.bfloat16, "float32": ttnn.float32, "bfloat8_b": ttnn.bfloat8_b,
            "bfloat4_b": ttnn.bfloat4_b, "uint32": ttnn.uint32, "int32": ttnn.int32,
            "uint16": ttnn.uint16}[name]


def layout_of(ttnn, name: str):
    return {"TILE": ttnn.TILE_LAYOUT, "ROW_MAJOR": ttnn.ROW_MAJOR_LAYOUT}[name]


def compute_kernel_config(ttnn, spec: dict):
    return ttnn.WormholeComputeKernelConfig(
        math_fidelity=getattr(ttnn.MathFidelity, spec.get("math_fidelity", "HiFi4")),
        math_approx_mode=bool(spec.get("math_approx_mode", False)),
        fp32_dest_acc_en=bool(spec.get("fp32_dest_acc_en", False)),
        packer_l1_acc=bool(spec.get("packer_l1_acc", False)))


def topology_of(ttnn, name: str):
    return getattr(ttnn.Topology, name.capitalize())


FLOAT32_KWARGS = ("scale", "epsilon")


def weight_variant(kind: str, spec: dict) -> bool:
    """Whether the weight of program spec `spec`, read through a parameter that wants
    `kind`, gets its own placement (else the op reads the program's weight as it is)."""
    if kind == TILE_ROW:  # only gammas too wide for the row-major kernels
        return spec["layout"] == "ROW_MAJOR" and int(np.prod(spec["shape"])) > ROW_MAJOR_GAMMA_MAX_WIDTH
    return kind == PER_USER


def convert_kwargs(ttnn, kwargs: dict) -> dict:
    """Program literals -> ttnn objects, by parameter name. A memory_config stays a kind
    name here: its MemoryConfig depends on the output's shape (OpCall.output_memory)."""
    out = dict(kwargs)
    for key, value in kwargs.items():
        if value is None:
            continue
        if key == "dtype" and isinstance(value, str):
            out[key] = dtype_of(ttnn, value)
        elif key == "layout" and isinstance(value, str):
            out[key] = layout_of(ttnn, value)
        elif key == "compute_kernel_config" and isinstance(value, dict):
            out[key] = compute_kernel_config(ttnn, value)
        elif key == "input_tensor_a_activations":
            out[key] = [getattr(ttnn.UnaryOpType, a.upper()) for a in value]
        elif key == "topology" and isinstance(value, str):
            out[key] = topology_of(ttnn, value)
        elif key in FLOAT32_KWARGS and isinstance(value, float):
            # ttnn takes these as C++ floats. Some 0.81.1 bindings (chunked SDPA's scale)
            # accept only Python floats exactly representable in float32 and reject any
            # other ("incompatible function arguments"), so they get the float32 value the
            # kernel would use anyway.
            out[key] = float(np.float32(value))
    return out


def _memory_kw(c: OpCall, kw: dict, shape, index: int = 0) -> dict:
    """kw with memory_config resolved for output `index` of logical `shape`."""
    mem = c.output_memory(index, shape, kw.pop("memory_config", None))
    if mem is not None:
        kw["memory_config"] = mem
    return kw


# ------------------------------------------------------------------ embeddings and shapes
@ttnn_op("ttnn.embedding")
def embedding(c: OpCall, input_tensor, weight, **kw):
    shape = list(input_tensor.shape) + [weight.shape[-1]]
    return c.ttnn.embedding(input_tensor, weight, **_memory_kw(c, kw, shape))


@ttnn_op("ttnn.unsqueeze_to_4D")
def unsqueeze_to_4d(c: OpCall, tensor):
    return c.ttnn.unsqueeze_to_4D(tensor)


@ttnn_op("ttnn.transpose", produces_sharded=True)
def transpose(c: OpCall, input_tensor, dim1, dim2, **kw):
    shape = list(input_tensor.shape)
    shape[dim1], shape[dim2] = shape[dim2], shape[dim1]
    return c.ttnn.transpose(input_tensor, dim1, dim2, **_memory_kw(c, kw, shape))


@ttnn_op("ttnn.reshape")
def reshape(c: OpCall, input_tensor, shape, **kw):
    return c.ttnn.reshape(input_tensor, shape, **_memory_kw(c, kw, shape))


@ttnn_op("ttnn.slice")
def slice_(c: OpCall, input_tensor, slice_start, slice_end, **kw):
    shape = [e - s for s, e in zip(slice_start, slice_end)]
    return c.ttnn.slice(input_tensor, slice_start, slice_end, **_memory_kw(c, kw, shape))


@ttnn_op("ttnn.typecast")
def typecast(c: OpCall, input_tensor, dtype, **kw):
    return c.ttnn.typecast(input_tensor, c.dtype(dtype), **_memory_kw(c, kw, input_tensor.shape))


# ------------------------------------------------------------------ math
@ttnn_op("ttnn.rms_norm", weights=lambda op: {"weight": TILE_ROW})
def rms_norm(c: OpCall, input_tensor, **kw):
    # A wide gamma arrives as one TILE row (TILE_ROW, placed at load): same values, and the
    # norm then fits L1 at full model width (see ROW_MAJOR_GAMMA_MAX_WIDTH).
    return c.ttnn.rms_norm(input_tensor, **_memory_kw(c, kw, input_tensor.shape))


@ttnn_op("ttnn.linear")
def linear(c: OpCall, input_tensor_a, input_tensor_b, **kw):
    shape = list(input_tensor_a.shape)[:-1] + [input_tensor_b.shape[-1]]
    return c.ttnn.linear(input_tensor_a, input_tensor_b, **_memory_kw(c, kw, shape))


@ttnn_op("ttnn.add")
def add(c: OpCall, input_tensor_a, input_tensor_b, **kw):
    return c.ttnn.add(input_tensor_a, input_tensor_b, **_memory_kw(c, kw, input_tensor_a.shape))


@ttnn_op("ttnn.mul")
def mul(c: OpCall, input_tensor_a, input_tensor_b, **kw):
    return c.ttnn.mul(input_tensor_a, input_tensor_b, **_memory_kw(c, kw, input_tensor_a.shape))


@ttnn_op("ttnn.silu")
def silu(c: OpCall, input_tensor, **kw):
    return c.ttnn.silu(input_tensor, **_memory_kw(c, kw, input_tensor.shape))


# ------------------------------------------------------------------ attention
@ttnn_op("ttnn.experimental.nlp_create_qkv_heads")
def nlp_create_qkv_heads(c: OpCall, input, **kw):
    if kw.get("memory_config") is not None:  # DRAM or L1 (interleaved) for all three
        kw["memory_config"] = c.memory(kw["memory_config"], None)
    return c.ttnn.experimental.nlp_create_qkv_heads(input, **kw)


@ttnn_op("ttnn.experimental.nlp_create_qkv_heads_decode")
def nlp_create_qkv_heads_decode(c: OpCall, input, **kw):
    # Writes q, k and v height-sharded, one user per core (its default output memory).
    kw.pop("memory_config", None)
    return c.ttnn.experimental.nlp_create_qkv_heads_decode(input, memory_config=c.ttnn.L1_HEIGHT_SHARDED_MEMORY_CONFIG,
                                                           **kw)


def _rotary_wants(op) -> dict:
    return {"cos_cache": USER_SHARDED, "sin_cache": USER_SHARDED} if op.kwargs.get("is_decode_mode") else {}


def _rotary_weights(op) -> dict:
    return {"trans_mat": PER_USER} if op.kwargs.get("is_decode_mode") else {}


@ttnn_op("ttnn.experimental.rotary_embedding_llama", wants=_rotary_wants, weights=_rotary_weights)
def rotary_embedding_llama(c: OpCall, input_tensor, cos_cache, sin_cache, trans_mat, is_decode_mode=False, **kw):
    if is_decode_mode:
        # One user per core: x, cos, sin and the transformation matrix all height-sharded on
        # the cores of x, one tile row per user. The matrix is a constant that the backend
        # places once per user at load (PER_USER); the output keeps x's memory config.
        grid = input_tensor.memory_config().shard_spec.grid
        head_dim = input_tensor.shape[-1]
        cos_cache = c.receive(cos_cache, c.height_sharded(grid, (TILE, head_dim)), "cos_cache")
        sin_cache = c.receive(sin_cache, c.height_sharded(grid, (TILE, head_dim)), "sin_cache")
        trans_mat = c.receive(trans_mat, c.height_sharded(grid, (TILE, TILE)), "trans_mat")
        kw.pop("memory_config", None)
        kw["memory_config"] = input_tensor.memory_config()
    else:
        kw = _memory_kw(c, kw, input_tensor.shape)
    return c.ttnn.experimental.rotary_embedding_llama(input_tensor, cos_cache, sin_cache, trans_mat,
                                                      is_decode_mode=is_decode_mode, **kw)


@ttnn_op("ttnn.fill_cache")
def fill_cache(c: OpCall, cache_tensor, input_tensor, batch_idx):
    return c.ttnn.fill_cache(cache_tensor, input_tensor, batch_idx)


@ttnn_op("ttnn.experimental.paged_update_cache", wants=lambda op: {"input_tensor": USER_SHARDED})
def paged_update_cache(c: OpCall, cache_tensor, input_tensor, **kw):
    # The update is height-sharded, one user per core (ttnn checks cores == users).
    input_tensor = c.receive(input_tensor, c.memory(USER_SHARDED, input_tensor.shape), "input_tensor")
    return c.ttnn.experimental.paged_update_cache(cache_tensor, input_tensor, **kw)


@ttnn_op("ttnn.transformer.scaled_dot_product_attention")
def scaled_dot_product_attention(c: OpCall, input_tensor_q, input_tensor_k, input_tensor_v, **kw):
    kw = _memory_kw(c, kw, input_tensor_q.shape)
    return c.ttnn.transformer.scaled_dot_product_attention(input_tensor_q, input_tensor_k, input_tensor_v, **kw)


@ttnn_op("ttnn.transformer.scaled_dot_product_attention_decode")
def scaled_dot_product_attention_decode(c: OpCall, input_tensor_q, input_tensor_k, input_tensor_v, **kw):
    # Sharded output is not supported for grouped-query attention: interleaved only.
    kw = _memory_kw(c, kw, input_tensor_q.shape)
    return c.ttnn.transformer.scaled_dot_product_attention_decode(input_tensor_q, input_tensor_k,
                                                                  input_tensor_v, **kw)


@ttnn_op("ttnn.experimental.paged_fill_cache")
def paged_fill_cache(c: OpCall, cache_tensor, input_tensor, page_table, **kw):
    return c.ttnn.experimental.paged_fill_cache(cache_tensor, input_tensor, page_table, **kw)


@ttnn_op("ttnn.transformer.paged_scaled_dot_product_attention_decode")
def paged_scaled_dot_product_attention_decode(c: OpCall, input_tensor_q, input_tensor_k, input_tensor_v, **kw):
    kw = _memory_kw(c, kw, input_tensor_q.shape)
    return c.ttnn.transformer.paged_scaled_dot_product_attention_decode(input_tensor_q, input_tensor_k,
                                                                        input_tensor_v, **kw)


@ttnn_op("ttnn.transformer.chunked_scaled_dot_product_attention")
def chunked_scaled_dot_product_attention(c: OpCall, input_tensor_q, input_tensor_k, input_tensor_v, *args, **kw):
    kw = _memory_kw(c, kw, input_tensor_q.shape)
    return c.ttnn.transformer.chunked_scaled_dot_product_attention(input_tensor_q, input_tensor_k, input_tensor_v,
                                                                   *args, **kw)


@ttnn_op("ttnn.experimental.nlp_concat_heads")
def nlp_concat_heads(c: OpCall, input_tensor, **kw):
    shape = list(input_tensor.shape)
    kw = _memory_kw(c, kw, [shape[0], 1, shape[2], shape[1] * shape[3]])
    return c.ttnn.experimental.nlp_concat_heads(input_tensor, **kw)


@ttnn_op("ttnn.experimental.nlp_concat_heads_decode", wants=lambda op: {"input_tensor": USER_SHARDED})
def nlp_concat_heads_decode(c: OpCall, input_tensor, **kw):
    # [1, users, heads (tile-padded), hd], height-sharded: one user's heads per core.
    input_tensor = c.receive(input_tensor, c.memory(USER_SHARDED, input_tensor.shape), "input_tensor")
    kw.pop("memory_config", None)  # its output is width-sharded by heads, as the op decides
    if len(input_tensor.memory_config().shard_spec.grid.ranges()) > 1:
        # 32 users on a grid narrower than 32 / 8 rows (Blackhole's 11 or 13 columns) span two
        # core ranges; ttnn 0.81.1 then takes its sub-core-grid path and needs the grid named.
        grid = c.mesh.compute_with_storage_grid_size()
        ttnn = c.ttnn
        kw["sub_core_grids"] = ttnn.CoreRangeSet(
            {ttnn.CoreRange(ttnn.CoreCoord(0, 0), ttnn.CoreCoord(grid.x - 1, grid.y - 1))})
    return c.ttnn.experimental.nlp_concat_heads_decode(input_tensor, **kw)


# ------------------------------------------------------------------ memory
@ttnn_op("ttnn.to_memory_config")
def to_memory_config(c: OpCall, tensor, memory_config, dtype=None):
    """The same values in another memory: a kind name (DRAM, L1, L1_HEIGHT_SHARDED) whose
    MemoryConfig is built for the tensor's shape. (For the lowering's explicit moves, e.g.
    attention output to the height-sharded input nlp_concat_heads_decode needs.)"""
    kw = {} if dtype is None else {"dtype": c.dtype(dtype) if isinstance(dtype, str) else dtype}
    return c.ttnn.to_memory_config(tensor, c.memory(memory_config, tensor.shape), **kw)


# ------------------------------------------------------------------ collectives
@ttnn_op("ttnn.all_reduce")
def all_reduce(c: OpCall, input_tensor, **kw):
    return c.ttnn.all_reduce(input_tensor, **_memory_kw(c, kw, input_tensor.shape))


@ttnn_op("ttnn.all_gather")
def all_gather(c: OpCall, input_tensor, dim, **kw):
    shape = list(input_tensor.shape)
    axis = kw.get("cluster_axis")
    shape[dim] *= c.mesh.shape[axis] if axis is not None else c.mesh.get_num_devices()
    return c.ttnn.all_gather(input_tensor, dim, **_memory_kw(c, kw, shape))
