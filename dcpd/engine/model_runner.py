"""Runs one scheduled step: builds the batch, plans attention once, runs the model, samples."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dcpd.attention.wrappers import MixedPlan, UnifiedBatchWrapper
from dcpd.batch import BatchRequest, DCPPlanConfig
from dcpd.engine.sampler import Sampler
from dcpd.engine.scheduler import SchedulerOutput
from dcpd.kv.cache import PagedKVCache
from dcpd.model.llama import LlamaForCausalLM


class _LayerHook:
    """The attention backend seen by the model, calling `on_layer(layer)` once a layer's K/V is in the cache."""

    def __init__(self, attention: UnifiedBatchWrapper, on_layer: Callable[[int], None]) -> None:
        self.attention = attention
        self.on_layer = on_layer

    def run(self, plan: MixedPlan, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.attention.run(plan, layer, q, k, v)
        self.on_layer(layer)
        return out


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: PagedKVCache, plan_config: DCPPlanConfig, *, seed: int = 0):
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.attention = UnifiedBatchWrapper(plan_config, kv_cache, model.config.num_heads)
        self.sampler = Sampler(seed)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, on_layer: Callable[[int], None] | None = None) -> dict[str, int]:
        """Compute the scheduled tokens; return the sampled token of every request that reached its end.

        `on_layer(layer)` (a prefill peer's KV streaming) runs as soon as each layer's K/V is written.
        """
        batch: list[BatchRequest] = []
        input_ids: list[int] = []
        for s in out.scheduled:
            req = s.request
            start = req.num_computed_tokens
            batch.append(
                BatchRequest(
                    request_id=req.request_id,
                    token_ids=req.token_ids,
                    num_prompt_tokens=req.num_prompt_tokens,
                    num_computed_tokens=start,
                    num_new_tokens=s.num_new_tokens,
                    block_ids=req.block_ids,
                )
            )
            input_ids.extend(req.token_ids[start : start + s.num_new_tokens])
        plan = self.attention.plan(batch)
        starts = plan.metadata.query_start_loc
        sampling = [i for i, s in enumerate(out.scheduled) if s.samples]
        logits_rows = torch.tensor([starts[i + 1] - 1 for i in sampling], dtype=torch.long, device=self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        attention = self.attention if on_layer is None else _LayerHook(self.attention, on_layer)
        logits = self.model(ids, plan.positions, attention, plan, logits_rows)
        tokens = self.sampler(logits.cpu(), [out.scheduled[i].request for i in sampling]) if sampling else []
        return {out.scheduled[i].request.request_id: t for i, t in zip(sampling, tokens)}
