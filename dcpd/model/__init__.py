"""Llama-family decoder, Hugging Face checkpoint loading, tokenizers and the embedded default model."""

from dcpd.model.config import ModelConfig, ModelLoadError
from dcpd.model.llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM", "ModelConfig", "ModelLoadError"]
