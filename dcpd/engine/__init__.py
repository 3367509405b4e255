"""The offline engine: request state, scheduler, block manager, model runner, sampler."""

from dcpd.engine.engine import GenerationResult, LLMEngine, RequestOutput
from dcpd.engine.request import FinishReason, RequestError, SamplingParams

__all__ = ["FinishReason", "GenerationResult", "LLMEngine", "RequestError", "RequestOutput", "SamplingParams"]
