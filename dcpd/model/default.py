"""The embedded default model: a small Llama with deterministic seeded weights and the byte tokenizer.

It makes every command work on a fresh machine with no download. Its text is
meaningless (the weights are random); point dcpd at a real checkpoint with
`--model DIR` (a local Hugging Face directory with config.json and *.safetensors).
"""

from __future__ import annotations

import torch

from dcpd.model.config import ModelConfig
from dcpd.model.llama import LlamaForCausalLM
from dcpd.model.loader import LoadedModel, parse_dtype
from dcpd.model.tokenizer import ByteTokenizer

DEFAULT_SEED = 1234


def default_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        head_dim=32,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        architecture="LlamaForCausalLM",
        bos_token_id=ByteTokenizer.BOS,
        eos_token_ids=(ByteTokenizer.EOS,),
    )


def build_default_model(*, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu") -> LoadedModel:
    config = default_config()
    gen = torch.Generator().manual_seed(DEFAULT_SEED)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.08)
    model = model.to(device=device, dtype=parse_dtype(dtype)).eval()
    model.inv_freq = config.rope_inv_freq().to(device)
    tokenizer = ByteTokenizer()
    return LoadedModel(model, config, tokenizer, tokenizer.eos_token_ids, "embedded-default")
