"""The `dcpd` command line."""

from __future__ import annotations

import argparse
import sys

from dcpd.offline import add_arguments
from dcpd.offline import run as run_offline


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcpd", description="Disaggregated LLM serving with decode context parallelism"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the attention engine on a small continuous batch and check it against SDPA")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    run = sub.add_parser("run", help="generate offline: every prompt concurrently, results in input order")
    add_arguments(run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from dcpd.demo import main as demo_main

        return demo_main(as_json=args.json)
    if args.command == "run":
        return run_offline(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
