"""What two peers must agree on before KV moves between them.

Each peer describes itself with a `PeerLayout` at registration; a pair whose
layouts differ is refused with one error naming every field that differs
(KV bytes from another model, dtype, block size or layout would decode as garbage).
"""

from __future__ import annotations

import dataclasses

import msgspec
import xxhash

from dcpd.disagg.transfer import TRANSFER_VERSION, dtype_name
from dcpd.kv.cache import PagedKVCache
from dcpd.model.config import ModelConfig

KV_LAYOUT = "head-major-v1"  # [layers, 2, kv_heads, blocks, block_size, head_dim]


class PeerMismatch(ValueError):
    """Two peers cannot exchange KV; the message lists the differing fields."""


class PeerLayout(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model_fingerprint: str  # hash of the model's hyper-parameters (not its weights)
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    kv_layout: str = KV_LAYOUT
    transfer_version: int = TRANSFER_VERSION

    @classmethod
    def describe(cls, config: ModelConfig, cache: PagedKVCache) -> PeerLayout:
        """This peer's layout: its model, and its cache's block size and dtype."""
        return cls.expected(config, block_size=cache.block_size, dtype=dtype_name(cache.dtype))

    @classmethod
    def expected(cls, config: ModelConfig, *, block_size: int, dtype: str) -> PeerLayout:
        """The layout a peer serving `config` with this block size and dtype describes (the router's check)."""
        return cls(
            model_fingerprint=model_fingerprint(config),
            architecture=config.architecture,
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            block_size=block_size,
            dtype=dtype,
        )


def model_fingerprint(config: ModelConfig) -> str:
    """A stable hash of every hyper-parameter: two checkpoints of one model family and size agree."""
    fields = dataclasses.asdict(config)
    return xxhash.xxh3_64_hexdigest(msgspec.json.encode(dict(sorted(fields.items()))))


def check_compatible(ours: PeerLayout, theirs: PeerLayout, *, peer: str = "peer") -> None:
    differences = [
        f"{field.name}: {peer} has {getattr(theirs, field.name)!r}, we have {getattr(ours, field.name)!r}"
        for field in msgspec.structs.fields(PeerLayout)
        if getattr(ours, field.name) != getattr(theirs, field.name)
    ]
    if differences:
        raise PeerMismatch(f"{peer} cannot exchange KV with us: " + "; ".join(differences))
