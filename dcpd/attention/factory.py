"""Factory functions: a wrapper together with a KV cache sized from the config (or one you pass)."""

from __future__ import annotations

from typing import TypeVar

import torch

from dcpd.attention.wrappers import BatchDCPDecodeWrapper, BatchDCPPrefillWrapper, UnifiedBatchWrapper
from dcpd.batch import DCPPlanConfig
from dcpd.kv.cache import PagedKVCache

W = TypeVar("W", BatchDCPPrefillWrapper, BatchDCPDecodeWrapper, UnifiedBatchWrapper)


def _create(
    cls: type[W],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    num_layers: int = 1,
    config: DCPPlanConfig | None = None,
    kv_cache: PagedKVCache | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> W:
    config = config or DCPPlanConfig()
    if kv_cache is None:
        kv_cache = PagedKVCache.from_config(
            config, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, device=device
        )
    elif (kv_cache.num_kv_heads, kv_cache.head_dim) != (num_kv_heads, head_dim):
        raise ValueError(
            f"kv_cache has {kv_cache.num_kv_heads} KV heads of dim {kv_cache.head_dim}, "
            f"asked for {num_kv_heads} of dim {head_dim}"
        )
    return cls(config, kv_cache, num_q_heads, backend=backend)


def create_prefill_wrapper(
    num_q_heads: int, num_kv_heads: int, head_dim: int, **options: object
) -> BatchDCPPrefillWrapper:
    """Options: num_layers, config, kv_cache, dtype, device, backend (see `_create`)."""
    return _create(BatchDCPPrefillWrapper, num_q_heads, num_kv_heads, head_dim, **options)  # type: ignore[arg-type]


def create_decode_wrapper(
    num_q_heads: int, num_kv_heads: int, head_dim: int, **options: object
) -> BatchDCPDecodeWrapper:
    """Options: num_layers, config, kv_cache, dtype, device, backend (see `_create`)."""
    return _create(BatchDCPDecodeWrapper, num_q_heads, num_kv_heads, head_dim, **options)  # type: ignore[arg-type]


def create_unified_wrapper(
    num_q_heads: int, num_kv_heads: int, head_dim: int, **options: object
) -> UnifiedBatchWrapper:
    """Options: num_layers, config, kv_cache, dtype, device, backend (see `_create`)."""
    return _create(UnifiedBatchWrapper, num_q_heads, num_kv_heads, head_dim, **options)  # type: ignore[arg-type]
