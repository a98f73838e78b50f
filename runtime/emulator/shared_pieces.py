"""Matmul operands whose chips hold equal pieces, held once (the mesh emulator's weights).

A TG program of a model with fewer heads than chips gives many chips the same piece of a
matmul weight: the chips of one KV head whose query head is padding hold equal wqkv
pieces, padded heads give all-zero wo pieces, tile padding leaves whole MLP pieces zero.
SharedPieces holds each distinct piece once; a linear multiplies each once (the same
float64 products and sums as chip by chip, so the same bits) and every chip takes its
piece's result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import exact_gemm
from .fidelity import PreparedWeight

LEAD = 2  # leading dimensions of a mesh value: mesh rows, mesh columns


@dataclass
class SharedPieces(PreparedWeight):
    """A matmul operand whose chips hold only a few distinct pieces (a TG program of a
    model with fewer heads than chips: the chips of one KV head, and those whose query
    head is padding, hold equal wqkv pieces): `values` [U, N, K] holds each distinct piece
    once and chip (i, j) holds values[chip_piece[i * cols + j]]. A linear on a replicated
    activation multiplies by the U pieces only, and every chip takes its piece's result:
    the same float64 products and sums, so the same bits, for U/(rows*cols) of the bytes."""

    chip_piece: torch.Tensor = None  # [rows * cols] int64
    lead: tuple = (1, 1)
    chips_of_piece: list = field(init=False)  # per piece, the chips holding it

    def __post_init__(self):
        self.chips_of_piece = [(self.chip_piece == u).nonzero().flatten() for u in range(len(self.values))]

    def piece(self, i: int, j: int) -> torch.Tensor:
        return self.values[int(self.chip_piece[i * self.lead[1] + j])]


def share_equal_pieces(weight: PreparedWeight) -> PreparedWeight:
    """A stacked operand [rows, cols, N, K] whose chips hold fewer distinct pieces than
    there are chips, as SharedPieces; otherwise unchanged. Pieces are grouped by a
    checksum, then compared exactly."""
    values = weight.values
    if values.shape[0] == 1 and values.shape[1] == 1:
        return weight
    lead = tuple(values.shape[:LEAD])
    flat = values.reshape(lead[0] * lead[1], *values.shape[LEAD:])
    sums = flat.flatten(1).to(torch.float64)
    keys = torch.stack([sums.sum(1), (sums * sums).sum(1)], 1).tolist()
    distinct, chip_piece = [], []
    for chip, key in enumerate(keys):
        for index, (rep, rep_key) in enumerate(distinct):
            if rep_key == key and torch.equal(flat[rep], flat[chip]):
                chip_piece.append(index)
                break
        else:
            chip_piece.append(len(distinct))
            distinct.append((chip, key))
    if len(distinct) == len(keys):
        return weight
    pieces = flat[[rep for rep, _ in distinct]].clone()
    return SharedPieces(pieces, weight.parts, weight.multiplier, torch.tensor(chip_piece), lead)


def against_every_piece(x: torch.Tensor, pieces: torch.Tensor) -> torch.Tensor:
    """One chip's activation x [..., M, K] against pieces [P, N, K] -> [P, ..., M, N], as
    one GEMM against the pieces side by side [P * N, K] (32 small batched GEMVs cost 2-3x
    the time of one wide one)."""
    count, n = pieces.shape[0], pieces.shape[1]
    acc = exact_gemm.linear(x, pieces.reshape(count * n, pieces.shape[2]))
    return acc.unflatten(-1, (count, n)).movedim(-2, 0)


def shared_product(act: torch.Tensor, weight: SharedPieces) -> torch.Tensor:
    """act @ each chip's piece^T, reading each distinct piece once: with a replicated
    activation one matmul against the pieces, each chip then taking its piece's result;
    otherwise one matmul per piece over the chips that hold it."""
    pieces = weight.values  # [U, N, K]
    if act.shape[0] == 1 and act.shape[1] == 1:
        acc = against_every_piece(act[0, 0], pieces)
        return acc[weight.chip_piece].reshape(*weight.lead, *acc.shape[1:])
    rows, cols = weight.lead
    flat = act.expand(rows, cols, *act.shape[LEAD:]).reshape(rows * cols, *act.shape[LEAD:])
    acc = torch.empty(*flat.shape[:-1], pieces.shape[1], dtype=torch.float64)
    for index, chips in enumerate(weight.chips_of_piece):
        held = flat[chips]
        acc[chips] = exact_gemm.matmul(held.reshape(len(chips), -1, held.shape[-1]), pieces[index][None]).reshape(
            *held.shape[:-1], pieces.shape[1])
    return acc.reshape(rows, cols, *acc.shape[1:])
