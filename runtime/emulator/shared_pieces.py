"""Matmul operands whose chips hold equal pieces, held once (the mesh emulator's weights).

A TG program of a model with fewer heads than chips gives many chips the same piece of a
matmul weight: the chips of one KV head whose query head is padding hold equal wqkv
pieces, padded heads give all-zero wo pieces, tile padding leaves whole MLP pieces zero.
SharedPieces holds each distinct piece once; a linear multiplies each once (the same
float64 products and sums as chip by chip, so the same bits) and every chip takes its
piece's result.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
    return SharedPieces(pieces, weight.parts, weight.multiplier, weight.as_stored, chip_piece=torch.tensor(chip_piece),
                        lead=lead)
