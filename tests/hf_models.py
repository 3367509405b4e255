"""Small random Hugging Face checkpoints (transformers is a test-only dependency)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def make_checkpoint(
    path: Path,
    arch: str = "llama",
    *,
    vocab: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 160,
    rope_theta: float = 50000.0,
    rope_scaling: dict | None = None,
    tie: bool = False,
    seed: int = 0,
    max_shard_size: str | None = None,
    init_range: float = 0.15,
):
    """Save a random model with safetensors to `path`; return the transformers model (fp32, eval)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rope_theta=rope_theta,
        tie_word_embeddings=tie,
        initializer_range=init_range,
        bos_token_id=1,
        eos_token_id=2,
    )
    if rope_scaling is not None:
        common["rope_scaling"] = rope_scaling
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
        with torch.no_grad():  # random non-zero biases so that they matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    else:
        raise ValueError(arch)
    model = model.float().eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return model
