"""Paged attention with exact LSE merging and DCP sharding, planned once per step and run per layer."""

from dcpd.attention.factory import create_decode_wrapper, create_prefill_wrapper, create_unified_wrapper
from dcpd.attention.merge import merge_partials, merge_state_pair, merge_states, reduce_reference
from dcpd.attention.wrappers import (
    BatchDCPDecodeWrapper,
    BatchDCPPrefillWrapper,
    BatchExecutor,
    MixedPlan,
    UnifiedBatchWrapper,
)

__all__ = [
    "BatchDCPDecodeWrapper",
    "BatchDCPPrefillWrapper",
    "BatchExecutor",
    "MixedPlan",
    "UnifiedBatchWrapper",
    "create_decode_wrapper",
    "create_prefill_wrapper",
    "create_unified_wrapper",
    "merge_partials",
    "merge_state_pair",
    "merge_states",
    "reduce_reference",
]
