"""`dcpd generate`: send prompts to a running daemon, print the text as it streams (or JSON lines)."""

from __future__ import annotations

import argparse
import json
import sys

from dcpd.offline import parse_prompt_ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint", "--frontend", dest="endpoint", default="tcp://127.0.0.1:5557",
        help="the daemon's frontend (the endpoint `serve --frontend` / `cluster --frontend` bound)",
    )  # fmt: skip
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--prompt-ids", action="append", default=[], type=parse_prompt_ids, help="1,2,3 (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each reply")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt, in input order")


def run(args: argparse.Namespace) -> int:
    from dcpd.client import Client, DcpdError

    if not args.prompt and not args.prompt_ids:
        print("dcpd generate: give at least one --prompt or --prompt-ids", file=sys.stderr)
        return 2
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, ignore_eos=args.ignore_eos)  # fmt: skip
    status = 0
    with Client(args.endpoint, timeout=args.timeout) as client:
        # all requests go out at once (the daemon batches them); replies are read in input order
        streams = [client.generate(prompt=text, **sampling) for text in args.prompt]
        streams += [client.generate(prompt_ids=ids, **sampling) for ids in args.prompt_ids]
        for stream in streams:
            try:
                if args.json:
                    result = stream.result()
                    record = {"prompt_ids": result.prompt_ids, "token_ids": result.token_ids, "text": result.text,
                              "finish_reason": result.finish_reason}  # fmt: skip
                    print(json.dumps(record), flush=True)
                else:
                    for chunk in stream:
                        print(chunk.text, end="", flush=True)
                    print(flush=True)
            except DcpdError as exc:
                print(f"dcpd generate: {exc}", file=sys.stderr)
                status = 1
    return status
