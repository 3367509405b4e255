"""Offline generation throughput: dcpd vs Hugging Face transformers on the same random Llama.

    python benchmarks/bench_generate.py [--json] [--prompts 32] [--new-tokens 128]

A random Llama of about 52M parameters (vocab 32000, hidden 512, 6 layers,
8 heads, MLP 1408, untied embeddings), fp32 on CPU. 32 prompts of 32..256 tokens
(seeded), 128 new tokens each, greedy, EOS ignored on both sides. Baselines in
the same run, on the same weights: transformers `generate` one prompt at a time,
and as one left-padded batch. Throughput = generated tokens / wall time,
prefill included. Also checks dcpd's tokens equal the sequential baseline's.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch
from report import emit  # benchmarks/report.py (the script's folder is on sys.path)
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from dcpd.batch import DCPPlanConfig
from dcpd.engine import LLMEngine, SamplingParams
from dcpd.model.loader import load_model_dir


def build_checkpoint(path: str) -> HFLlama:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=0.05,
    )  # fmt: skip
    model = HFLlama(config).float().eval()
    model.save_pretrained(path, safe_serialization=True)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_sequential(model: HFLlama, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    outputs = []
    start = time.perf_counter()
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False)  # fmt: skip
            outputs.append(out[0, len(prompt) :].tolist())
    return time.perf_counter() - start, outputs


def hf_batched(model: HFLlama, prompts: list[list[int]], new_tokens: int) -> float:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def dcpd_generate(path: str, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]], int]:
    engine = LLMEngine(load_model_dir(path), DCPPlanConfig(kv_cache_bytes=512 << 20))
    engine.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    steps_before = engine.num_steps
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    return time.perf_counter() - start, [r.token_ids for r in results], engine.num_steps - steps_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 32000) for _ in range(rng.randint(32, 256))] for _ in range(args.prompts)]
    generated = args.prompts * args.new_tokens
    with tempfile.TemporaryDirectory() as path:
        hf = build_checkpoint(path)
        params = sum(p.numel() for p in hf.parameters())
        dcpd_s, dcpd_tokens, steps = dcpd_generate(path, prompts, args.new_tokens)
        batched_s = hf_batched(hf, prompts, args.new_tokens)
        sequential_s, hf_tokens = hf_sequential(hf, prompts, args.new_tokens)
    same = sum(a == b for a, b in zip(dcpd_tokens, hf_tokens, strict=True))
    result = {
        "params_millions": round(params / 1e6, 1),
        "threads": torch.get_num_threads(),
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "dcpd_tok_s": generated / dcpd_s,
        "dcpd_steps": steps,
        "hf_sequential_tok_s": generated / sequential_s,
        "hf_batched_tok_s": generated / batched_s,
        "ratio_vs_hf_sequential": sequential_s / dcpd_s,
        "ratio_vs_hf_batched": batched_s / dcpd_s,
        "prompts_token_identical_to_hf": f"{same}/{args.prompts}",
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
