"""Decode-context-parallel placement: which rank stores which token, and where.

Token at global position p lives on rank (p // I) % N, where N = dcp_size and
I = interleave_size. On that rank it is local token (p // (I * N)) * I + p % I,
so local order follows global order and each rank's share of a sequence is a
prefix-closed, contiguous run of local slots.
"""

from __future__ import annotations

import torch


def owner_rank(position: int, dcp_size: int, interleave: int) -> int:
    return (position // interleave) % dcp_size


def local_length(length: int, rank: int, dcp_size: int, interleave: int) -> int:
    """How many of the first `length` tokens of a sequence rank `rank` stores."""
    base = length // interleave // dcp_size * interleave
    rest = length - base * dcp_size - rank * interleave
    return base + min(max(rest, 0), interleave)


def local_lengths(lengths: torch.Tensor, rank: int, dcp_size: int, interleave: int) -> torch.Tensor:
    """Vectorised `local_length` over a tensor of sequence lengths."""
    base = lengths // interleave // dcp_size * interleave
    rest = lengths - base * dcp_size - rank * interleave
    return base + rest.clamp(0, interleave)


def local_index(positions: torch.Tensor, dcp_size: int, interleave: int) -> torch.Tensor:
    """Rank-local token index of each global position (on its owner rank)."""
    return positions // (interleave * dcp_size) * interleave + positions % interleave


def owner_ranks(positions: torch.Tensor, dcp_size: int, interleave: int) -> torch.Tensor:
    return (positions // interleave) % dcp_size
