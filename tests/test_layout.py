"""Peers that disagree on model, dtype, block size or KV layout are refused, naming every difference."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest
import torch

from dcpd.disagg.layout import PeerLayout, PeerMismatch, check_compatible, model_fingerprint
from dcpd.kv.cache import PagedKVCache
from dcpd.model.default import default_config


def layout(dtype: torch.dtype = torch.float32, block_size: int = 16, **config_changes) -> PeerLayout:
    config = dataclasses.replace(default_config(), **config_changes)
    cache = PagedKVCache(config.num_layers, 8, block_size, config.num_kv_heads, config.head_dim, dtype=dtype)
    return PeerLayout.describe(config, cache)


def test_identical_peers_are_compatible_and_layouts_travel_as_msgpack() -> None:
    ours = layout()
    theirs = msgspec.msgpack.decode(msgspec.msgpack.encode(layout()), type=PeerLayout)
    check_compatible(ours, theirs)
    assert model_fingerprint(default_config()) == ours.model_fingerprint


@pytest.mark.parametrize(
    ("theirs", "fields"),
    [
        (layout(dtype=torch.bfloat16), ["dtype: decode-1 has 'bfloat16', we have 'float32'"]),
        (layout(block_size=32), ["block_size: decode-1 has 32, we have 16"]),
        (layout(rope_theta=500000.0), ["model_fingerprint"]),
        (layout(num_layers=2), ["model_fingerprint", "num_layers: decode-1 has 2, we have 4"]),
    ],
)
def test_mismatches_are_refused_naming_each_field(theirs: PeerLayout, fields: list[str]) -> None:
    with pytest.raises(PeerMismatch) as info:
        check_compatible(layout(), theirs, peer="decode-1")
    message = str(info.value)
    assert message.startswith("decode-1 cannot exchange KV with us")
    for field in fields:
        assert field in message


def test_a_different_kv_layout_or_transfer_version_is_refused() -> None:
    ours = layout()
    for change in ({"kv_layout": "nhd"}, {"transfer_version": 1}):
        with pytest.raises(PeerMismatch, match=next(iter(change))):
            check_compatible(ours, msgspec.structs.replace(ours, **change))
