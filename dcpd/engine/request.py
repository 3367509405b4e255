"""Request state and sampling parameters for the engine."""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dcpd.batch import BatchPhase


class RequestError(ValueError):
    """A request the engine cannot accept (bad parameters, too long); the message names the problem."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # don't stop at the model's EOS / stop tokens (only at stop_token_ids)

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens={self.max_tokens!r}: must be an integer >= 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature={self.temperature!r}: must be in [0, 100]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k={self.top_k!r}: must be an integer >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**64):
            raise RequestError(f"seed={self.seed!r}: must be an integer in [0, 2**64)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def check_prompt(
    prompt_token_ids: Sequence[int], params: SamplingParams, *, vocab_size: int, max_model_len: int
) -> list[int]:
    """Check a request against the model (sampling, vocabulary, context); returns the prompt as a list."""
    params.validate()
    prompt = list(prompt_token_ids)
    if not prompt:
        raise RequestError("prompt is empty")
    bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"prompt has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    total = len(prompt) + params.max_tokens
    if total > max_model_len:
        raise RequestError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the "
            f"model's context of {max_model_len} tokens"
        )
    return prompt


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks, scheduled every step
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)  # prompt, then every generated token
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    generator: torch.Generator | None = None
    hold_kv: bool = False  # prefill peer: keep the KV blocks after finishing, until released after transfer

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending_tokens(self) -> int:
        """Known tokens whose KV is not computed yet (prompt chunks, the last sampled token, or a recompute)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def phase(self) -> BatchPhase:
        return BatchPhase.DECODE if self.num_pending_tokens == 1 and self.output_token_ids else BatchPhase.PREFILL

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
