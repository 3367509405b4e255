"""Paged KV cache: the tensors behind the block pool.

Layout (one tensor for all layers, head-major pages):

    kv[layer, kv_index, head, block, offset, dim]
    shape [num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim]

`kv_index` 0 is K, 1 is V. Token slot `s = block * block_size + offset`. For a
head, consecutive blocks are adjacent in memory, so a run of consecutive block
ids is a zero-copy [heads, tokens, head_dim] view with unit stride in dim: the
layout the CPU flash-attention kernel reads fastest. A request's KV can be
gathered into, and scattered from, a contiguous buffer of shape
[num_layers, 2, num_kv_heads, n_blocks, block_size, head_dim] (what crosses a socket).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dcpd.batch import DCPPlanConfig
from dcpd.kv.block_pool import BlockPool


class KVCacheAllocationError(RuntimeError):
    """The KV cache asked for does not fit in the device's memory (now, at least)."""


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        reserve_blocks: int = 0,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if value < 1:
                raise ValueError(f"PagedKVCache.{name}={value}: must be >= 1")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        # Zero-filled so that never-written slots hold finite values.
        shape = (num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim)
        try:
            self.kv = torch.zeros(shape, dtype=dtype, device=self.device)
        except RuntimeError as exc:  # torch.OutOfMemoryError on a GPU, a plain RuntimeError on the CPU
            size = num_blocks * self.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
            raise KVCacheAllocationError(
                f"cannot allocate a KV cache of {size / 2**20:.0f} MiB on {self.device} "
                f"({(str(exc).strip().splitlines() or [type(exc).__name__])[-1]})"
            ) from None
        self.pool = BlockPool(num_blocks, reserve_blocks)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * num_kv_heads * block_size * head_dim * itemsize

    @classmethod
    def from_config(
        cls,
        config: DCPPlanConfig,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """Size the cache from `config.kv_cache_bytes` and reserve `kv_reserve_fraction` of it."""
        per_block = cls.bytes_per_block(num_layers, config.block_size, num_kv_heads, head_dim, dtype)
        num_blocks = config.kv_cache_bytes // per_block
        if num_blocks < 2:
            raise ValueError(
                f"DCPPlanConfig.kv_cache_bytes={config.kv_cache_bytes}: holds {num_blocks} blocks of "
                f"{per_block} bytes; need at least 2"
            )
        reserve = min(math.ceil(config.kv_reserve_fraction * num_blocks), num_blocks - 1)
        return cls(
            num_layers,
            num_blocks,
            config.block_size,
            num_kv_heads,
            head_dim,
            dtype=dtype,
            device=device,
            reserve_blocks=reserve,
        )

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def layer(self, layer: int) -> torch.Tensor:
        """[2, num_kv_heads, num_blocks, block_size, head_dim] view of one layer."""
        return self.kv[layer]

    def layer_slots(self, layer: int) -> torch.Tensor:
        """[2, num_kv_heads, num_slots, head_dim] view of one layer (slot-addressed)."""
        return self.kv[layer].view(2, self.num_kv_heads, self.num_slots, self.head_dim)

    def _block_index(self, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        raw = torch.as_tensor(block_ids)
        if raw.numel() and (raw.dtype.is_floating_point or raw.dtype == torch.bool):
            raise ValueError(f"block ids must be integers, got {raw.dtype}")
        index = raw.to(dtype=torch.long, device=self.device)
        if index.ndim != 1:
            raise ValueError(f"block ids must be a flat list, got shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_blocks):
            raise ValueError(f"block ids out of range 0..{self.num_blocks - 1}")
        return index

    def gather(
        self, block_ids: Sequence[int] | torch.Tensor, *, layers: slice = slice(None), out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Copy the given blocks (in order) of `layers` into a contiguous buffer.

        Returns [n_layers, 2, num_kv_heads, len(block_ids), block_size, head_dim].
        Pass `out` (e.g. pinned host memory) to avoid an allocation.
        """
        index = self._block_index(block_ids)
        src = self.kv[layers]
        if out is None:
            return src.index_select(3, index)
        expected = (*src.shape[:3], index.numel(), *src.shape[4:])
        if tuple(out.shape) != expected or out.dtype != self.dtype:
            raise ValueError(f"gather out must be {expected} {self.dtype}, got {tuple(out.shape)} {out.dtype}")
        if out.device == self.device:
            return torch.index_select(src, 3, index, out=out)
        out.copy_(src.index_select(3, index), non_blocking=True)
        return out

    def scatter(
        self, block_ids: Sequence[int] | torch.Tensor, data: torch.Tensor, *, layers: slice = slice(None)
    ) -> None:
        """Write a buffer shaped like `gather`'s result into the given blocks."""
        index = self._block_index(block_ids)
        dst = self.kv[layers]
        expected = (*dst.shape[:3], index.numel(), *dst.shape[4:])
        if tuple(data.shape) != expected:
            raise ValueError(f"scatter data must be {expected}, got {tuple(data.shape)}")
        if data.dtype != self.dtype:
            raise ValueError(f"scatter data dtype {data.dtype} does not match cache dtype {self.dtype}")
        dst.index_copy_(3, index, data.to(self.device, non_blocking=True))
