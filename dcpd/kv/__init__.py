"""Paged KV cache: block pool bookkeeping and the KV tensors."""

from dcpd.kv.block_pool import BlockPool, BlockPoolError, BlockPoolStats, KVCacheExhausted
from dcpd.kv.cache import PagedKVCache

__all__ = ["BlockPool", "BlockPoolError", "BlockPoolStats", "KVCacheExhausted", "PagedKVCache"]
