"""Matmuls as Wormhole's matrix unit (FPU) computes them: math fidelity, Dst accumulation,
the packer's rounding. Deterministic and independent of the CPU it runs on.

What the hardware does (public sources, read for this module):
- tt-isa-documentation, WormholeB0/TensixTile/TensixCoprocessor/MVMUL.md and
  SrcASrcB.md ("Fidelity phases (floating-point)"): MVMUL computes Dst += SrcB @ SrcA;
  the multipliers take at most 5 bits of a SrcA significand and 7 bits of a SrcB
  significand per pass. A fidelity phase picks which bits:
      phase 0: SrcA implicit 1 + 4 high mantissa bits  x  SrcB implicit 1 + 6 high bits
      phase 1: SrcA next 5 mantissa bits (BF16: the last 3)  x  SrcB high 7 bits
      phase 2: SrcA high 5 bits  x  SrcB remaining 4 mantissa bits (BF16: the last 1)
      phase 3: SrcA next 5 bits  x  SrcB remaining bits
  The pseudocode helpers SrcAFidelityBits / SrcBFidelityBits in MatrixUnit.md are the
  masks below (0xfff80000 and 0xfffe0000 on the float32 bit pattern). A TF32 SrcA keeps
  its last mantissa bit out of every phase.
- tt-buda docs/public/dataformats.rst ("Math Fidelity"): LoFi runs phase 0, HiFi2
  phases 0-1, HiFi3 phases 0-2, HiFi4 all four. tt-metal tech_reports/matrix_engine:
  throughput divides by the number of phases.
- Which operand lands where: ttnn's LLK, tt_metal/hw/ckernels/wormhole_b0/metal/llk_api/
  llk_unpack_AB_matmul_api.h ("In0 -> srcB, In1 -> srcA"), and tt-llk's MatmulGolden
  (tests/python_tests/helpers/golden_generators.py: "lhs into SrcB, rhs into SrcA"). So in
  ttnn.linear(x, w) the activation x is SrcB (7 + 4 bits) and the weight w is SrcA (5 + 5).
- Src formats: bfloat16, bfloat8_b and bfloat4_b unpack losslessly to BF16; float32
  unpacks to TF32 (low 13 mantissa bits dropped) when fp32_dest_acc_en is set
  (SrcASrcB.md "Data types"; tt-llk's SrcFormatModel._fp32_to_tf32 truncates).
- Dst: float32 with fp32_dest_acc_en, else bfloat16; each MVMUL (16 products) and each
  fidelity phase adds into it (MVMUL.md functional model). With a bfloat16 Dst the sum is
  rounded to TF32 then to BF16, both ties away from zero (tt-metal issue #46101).
- Packer: Dst float32 -> bfloat16 output is round to nearest, ties away from zero
  (Packers/FormatConversion.md "Early format conversion"; tt-metal issue #17018 shows a
  tie rounding up); float32 output is an identity.

How it is emulated: every product the multiplier forms is exact in float64 (at most
11 x 10 significant bits), the phases are sums of such products, and a dot product is
their float64 sum: exact unless the products of one dot product span more than ~2^30,
so the result does not depend on the order of summation, hence not on the CPU's GEMM
kernel, its ISA or its thread count. That exact sum is rounded once to float32 (Dst)
and then as the packer rounds. Not modelled: the FPU's internal rounding inside one
16-product MVMUL and between float32 Dst additions (below float32's last bit), the
reload precision of partial sums when packer_l1_acc is off (it depends on the K block
ttnn's program config picks), denormal and NaN/inf handling beyond flushing denormal
operands.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import exact_gemm

# Fidelity -> the phases it runs (tt-buda dataformats.rst "Math Fidelity").
PHASES: dict[str, tuple[int, ...]] = {"LoFi": (0,), "HiFi2": (0, 1), "HiFi3": (0, 1, 2), "HiFi4": (0, 1, 2, 3)}

# Float32 bit masks of the bits each source register's multiplier takes in its first pass
# (MatrixUnit.md SrcAFidelityBits / SrcBFidelityBits): sign, exponent, implicit one and
# 4 (SrcA) or 6 (SrcB) mantissa bits. The second pass takes what the first left.
HIGH_BITS = {"A": 0xFFF80000, "B": 0xFFFE0000}
TF32_BITS = {"A": 0xFFFFC000, "B": 0xFFFFE000}  # TF32; SrcA ignores its last mantissa bit
BF16_BITS = 0xFFFF0000
EXPONENT = 0x7F800000


def _signed(mask: int) -> int:
    """A 32-bit mask as the int32 torch holds it."""
    return mask - (1 << 32) if mask >= 1 << 31 else mask


@dataclass(frozen=True)
class Multiplier:
    """How one matmul forms and sums its products: its compute-kernel settings.
    `fidelity` None means exact products (fidelity not emulated)."""

    fidelity: str | None
    fp32_dest: bool = True

    @classmethod
    def of(cls, compute_kernel_config: dict | None, emulate: bool = True) -> "Multiplier":
        """From an op's compute_kernel_config. A linear without one, or with emulation off,
        is computed with exact products and a float32 accumulator."""
        if not emulate or not compute_kernel_config:
            return cls(None, True)
        fidelity = compute_kernel_config.get("math_fidelity", "HiFi4")
        if fidelity not in PHASES:
            raise ValueError(f"unknown math fidelity '{fidelity}' (choose {', '.join(PHASES)})")
        return cls(fidelity, bool(compute_kernel_config.get("fp32_dest_acc_en", False)))

    @property
    def phases(self) -> tuple[int, ...]:
        return PHASES[self.fidelity] if self.fidelity else ()


# ---------------------------------------------------------------- operands in Src registers
def src_value(x: torch.Tensor, side: str, fp32_dest: bool = True) -> torch.Tensor:
    """float32 values as the unpacker leaves them in SrcA or SrcB: bfloat16 values (and
    block floats, held as bfloat16) exactly; other float32 values truncated to TF32 (to
    BF16 without fp32_dest); a TF32 SrcA loses its last mantissa bit; denormals -> 0."""
    bits = x.detach().to(torch.float32).contiguous().view(torch.int32)
    mask = TF32_BITS[side] if fp32_dest else BF16_BITS
    bits = (bits & _signed(mask)) * ((bits & EXPONENT) != 0)
    return bits.view(torch.float32)


def split(src: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): the bits a source register's first pass takes, and the rest (exact)."""
    high = (src.view(torch.int32) & _signed(HIGH_BITS[side])).view(torch.float32)
    return high, src - high


def phase_operands(x: torch.Tensor, w: torch.Tensor, phase: int, fp32_dest: bool = True):
    """(SrcB part of the activation x, SrcA part of the weight w) one phase multiplies:
    phase bit 0 picks SrcA's low bits, bit 1 SrcB's (MatrixUnit.md)."""
    b_high, b_low = split(src_value(x, "B", fp32_dest), "B")
    a_high, a_low = split(src_value(w, "A", fp32_dest), "A")
    return (b_low if phase & 2 else b_high), (a_low if phase & 1 else a_high)


# ---------------------------------------------------------------- weights, prepared once
@dataclass
class PreparedWeight:
    """A linear's [N, K] weight as the multiplier sees it: for each activation part in
    `parts` ("src": whole SrcB value, "high"/"low": SrcB's passes), the sum of the SrcA
    parts the phases pair with it, side by side along K. Held in the narrowest form that
    holds the values exactly (exact_gemm.stored: block mantissas for block-float weights,
    else bfloat16 or float32); the matmul forms float64 products from them."""

    values: torch.Tensor  # [N, K * len(parts)]: block mantissas (int8), bfloat16, float32, float64
    parts: tuple[str, ...]
    multiplier: Multiplier
    as_stored: bool = False  # values are the stored weight's own (multiplied as stored)

    def with_values(self, values: torch.Tensor) -> "PreparedWeight":
        """This operand's description over other values (a chip's piece, a stack of them)."""
        return PreparedWeight(values, self.parts, self.multiplier, self.as_stored)

    def zero_pieces(self) -> torch.Tensor | None:
        """exact_gemm.zero_pieces over values' leading entries flattened (a mesh stack's
        chips: padding pieces are all zero), found once."""
        if "_zero" not in self.__dict__:
            self.__dict__["_zero"] = exact_gemm.zero_pieces(self.values.reshape(-1, *self.values.shape[-2:]))
        return self.__dict__["_zero"]

    def dense(self) -> torch.Tensor:
        """The operand's values as a float tensor [..., N, K * len(parts)]."""
        return exact_gemm.unpack_blocks(self.values) if self.values.dtype == torch.int8 else self.values


def prepare_weight(w_nk: torch.Tensor, multiplier: Multiplier) -> PreparedWeight:
    """The float64 operand for `multiplier`'s phases. With phases P, the product is
        x_high @ (sum of SrcA parts of P's phases 0/1) + x_low @ (... of phases 2/3),
    e.g. LoFi x_high @ w_high, HiFi2 x_high @ w, HiFi4 x @ w (w, x as held in Src)."""
    if multiplier.fidelity is None:
        return PreparedWeight(_stored(w_nk, w_nk), ("src",), multiplier, as_stored=True)
    a_high, a_low = split(src_value(w_nk, "A", multiplier.fp32_dest), "A")
    by_b_part = {}
    for phase in multiplier.phases:
        part = a_low if phase & 1 else a_high
        key = "low" if phase & 2 else "high"
        by_b_part[key] = part if key not in by_b_part else by_b_part[key] + part
    if len(by_b_part) == 2 and torch.equal(by_b_part["high"], by_b_part["low"]):
        by_b_part = {"src": by_b_part["high"]}  # HiFi4
    parts = tuple(by_b_part)
    values = torch.cat([by_b_part[p] for p in parts], dim=-1)
    as_stored = values.shape == w_nk.shape and torch.equal(values, w_nk.to(values.dtype))
    return PreparedWeight(_stored(values, w_nk), parts, multiplier, as_stored)


def _stored(values: torch.Tensor, w_nk: torch.Tensor) -> torch.Tensor:
    """Operand values in their narrowest exact form (exact_gemm.stored); the stored weight
    itself when that is its form and the values are its own (held once)."""
    values = exact_gemm.stored(values)
    if values.dtype == w_nk.dtype and values.shape == w_nk.shape and torch.equal(values, w_nk):
        return w_nk
    return values


def _activation(x: torch.Tensor, parts: tuple[str, ...], multiplier: Multiplier) -> torch.Tensor:
    """The activation parts a prepared weight pairs with, side by side along K (values
    exact in float32; the matmul widens them to float64)."""
    if multiplier.fidelity is None:
        return x
    src = src_value(x, "B", multiplier.fp32_dest)
    if parts == ("src",):
        return src
    high, low = split(src, "B")
    chosen = {"high": high, "low": low}
    return torch.cat([chosen[p] for p in parts], dim=-1)


# ---------------------------------------------------------------- rounding
def round_half_away(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """float32 or float64 values rounded to `mantissa_bits` mantissa bits, to nearest with
    ties away from zero, denormals flushed to +0 (the packer's and Dst's rounding)."""
    if x.dtype == torch.float64:
        int_type, width, exponent = torch.int64, 52, 0x7FF0000000000000
    else:
        x, int_type, width, exponent = x.to(torch.float32), torch.int32, 23, EXPONENT
    bits = x.contiguous().view(int_type)
    drop = width - mantissa_bits
    rounded = (bits + (1 << (drop - 1))) & ~((1 << drop) - 1)  # sign-magnitude: magnitude up
    return (rounded * ((bits & exponent) != 0)).view(x.dtype)


def to_bfloat16(dst: torch.Tensor) -> torch.Tensor:
    """The packer's float32 Dst -> bfloat16: nearest, ties away from zero."""
    return round_half_away(dst.to(torch.float32), 7).to(torch.bfloat16)  # exact: 7 bits left


def _bf16_dst(x64: torch.Tensor) -> torch.Tensor:
    """A sum written to a bfloat16 Dst: rounded to TF32, then to BF16, both ties away."""
    return round_half_away(round_half_away(x64, 10), 7)


# ---------------------------------------------------------------- the matmul
FACE = 16  # K values one MVMUL consumes
K_TILE = 32


def fp32_dst(acc: torch.Tensor, bias) -> torch.Tensor:
    """A float64 sum of exact products, bias added, rounded once to the float32 Dst."""
    if bias is not None:
        acc = acc + bias.reshape(-1).to(torch.float64)
    return acc.to(torch.float32)


def pack(dst: torch.Tensor, dtype: str | None, multiplier: Multiplier) -> torch.Tensor:
    """Dst as the packer writes the output dtype: bfloat16 rounded ties away (to nearest
    even without fidelity emulation), float32 otherwise (block floats: the executor)."""
    if dtype != "bfloat16":
        return dst
    return to_bfloat16(dst) if multiplier.fidelity else dst.to(torch.bfloat16)


def prepared_product(x: torch.Tensor, pieces: torch.Tensor, weight: PreparedWeight, bias=None,
                     dtype: str | None = None, w_index: torch.Tensor | None = None,
                     zero: torch.Tensor | None = None) -> torch.Tensor:
    """A float32-Dst linear over a prepared weight's pieces: x [Bx, M, K] (Bx 1: shared by
    every entry), pieces [U, N, K'] held as `weight` describes, entry b against
    pieces[w_index[b]] (pieces[b] without an index) -> [B, M, N] as the packer writes
    `dtype`. Exact products summed in float64 with the bias, rounded once to the float32
    Dst, then packed: in one kernel call where exact_gemm's kernel runs (skipping the
    pieces `zero` flags as all zero), else in torch (the same bits)."""
    multiplier = weight.multiplier
    out_mode = "float32" if dtype != "bfloat16" else "bf16_away" if multiplier.fidelity else "bf16_even"
    src_mask = 0 if multiplier.fidelity is None else TF32_BITS["B"] if multiplier.fp32_dest else BF16_BITS
    done = exact_gemm.device_linear(x, pieces, w_index, src_mask, HIGH_BITS["B"], weight.parts, bias, out_mode, zero)
    if done is not None:
        return done
    acc = exact_gemm.matmul(_activation(x, weight.parts, multiplier), pieces, w_index)
    return pack(fp32_dst(acc, bias), dtype, multiplier)


def _bf16_dest_product(x, w_nk, bias, multiplier: Multiplier) -> torch.Tensor:
    """A bfloat16 Dst: per 32-wide K tile, each phase's two 16-product MVMULs add into Dst
    in turn, each sum rounded as _bf16_dst (tt-llk's matmul loop: tiles, then phases)."""
    k = x.shape[-1]
    parts = {p: phase_operands(x, w_nk, p, fp32_dest=False) for p in multiplier.phases}
    acc = torch.zeros(*x.shape[:-1], w_nk.shape[0], dtype=torch.float64)
    for tile in range(0, k, K_TILE):
        for phase in multiplier.phases:
            xb, wa = parts[phase]
            for start in range(tile, min(tile + K_TILE, k), FACE):
                chunk = slice(start, min(start + FACE, k))
                dot = torch.nn.functional.linear(xb[..., chunk].to(torch.float64), wa[:, chunk].to(torch.float64))
                acc = _bf16_dst(acc + dot)
    if bias is not None:
        acc = _bf16_dst(acc + bias.reshape(-1).to(torch.float64))
    return acc.to(torch.float32)


def linear(x: torch.Tensor, weight, bias=None, dtype: str | None = None,
           compute_kernel_config: dict | None = None) -> torch.Tensor:
    """ttnn.linear(x, w) as the device computes it. `weight` is the [N, K] weight (any
    float dtype) or a PreparedWeight (the backend prepares each weight once at load).
    Returns bfloat16 for a bfloat16 output (packer rounding), float32 otherwise (the
    executor rounds block-float outputs to their format)."""
    if isinstance(weight, PreparedWeight):
        multiplier = weight.multiplier
    else:
        multiplier = Multiplier.of(compute_kernel_config)
        if multiplier.fp32_dest or multiplier.fidelity is None:
            weight = prepare_weight(weight, multiplier)
    if isinstance(weight, PreparedWeight):
        out = prepared_product(x.reshape(1, -1, x.shape[-1]), weight.values[None], weight, bias, dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return pack(_bf16_dest_product(x, weight, bias, multiplier), dtype, multiplier)
