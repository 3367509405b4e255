"""`dcpd run`: the engine offline, all prompts concurrently, one result per prompt in input order."""

from __future__ import annotations

import argparse
import json
import sys
import time

from dcpd.batch import DCPPlanConfig
from dcpd.engine import LLMEngine, RequestError, SamplingParams
from dcpd.model.config import ModelLoadError
from dcpd.model.default import build_default_model
from dcpd.model.loader import LoadedModel, load_model_dir


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r}: expected comma-separated integers") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids: empty list")
    return ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local Hugging Face model directory (default: the embedded demo model)")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument(
        "--prompt-ids", action="append", default=[], type=parse_prompt_ids, help="prompt token ids 1,2,3 (repeatable)"
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS token")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens-per-batch", type=int, default=8192)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--kv-cache-mb", type=int, default=256, help="KV cache memory in MiB")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt, in input order")


def load(model: str | None, dtype: str, device: str) -> LoadedModel:
    if model is None:
        return build_default_model(dtype=dtype, device=device)
    return load_model_dir(model, dtype=dtype, device=device)


def run(args: argparse.Namespace) -> int:
    if not args.prompt and not args.prompt_ids:
        print("dcpd run: give at least one --prompt or --prompt-ids", file=sys.stderr)
        return 2
    try:
        loaded = load(args.model, args.dtype, args.device)
        config = DCPPlanConfig(
            max_tokens_per_batch=args.max_tokens_per_batch,
            max_batch_size=args.max_batch_size,
            kv_cache_bytes=args.kv_cache_mb << 20,
        )
        engine = LLMEngine(loaded, config)
        prompts = [loaded.tokenizer.encode(text) for text in args.prompt] + list(args.prompt_ids)
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
        )
        ids = [engine.add_request(p, params) for p in prompts]
    except (ModelLoadError, RequestError, ValueError) as exc:
        print(f"dcpd run: {exc}", file=sys.stderr)
        return 1
    show_progress = sys.stderr.isatty()
    started = time.monotonic()
    while engine.has_unfinished():
        engine.step()
        if show_progress:
            done = sum(engine.requests[r].is_finished for r in ids)
            print(f"\r{done}/{len(ids)} done, {engine.num_steps} steps", end="", file=sys.stderr, flush=True)
    if show_progress:
        print(f"\r{len(ids)}/{len(ids)} done in {time.monotonic() - started:.1f} s", file=sys.stderr)
    for rid in ids:
        result = engine.result(rid)
        if args.json:
            record = {
                "prompt_ids": result.prompt_token_ids,
                "token_ids": result.token_ids,
                "text": result.text,
                "finish_reason": result.finish_reason,
            }
            print(json.dumps(record), flush=True)
        else:
            print(result.text, flush=True)
    return 0
