"""The `dcpd` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcpd", description="Disaggregated LLM serving with decode context parallelism"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the attention engine on a small continuous batch and check it against SDPA")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from dcpd.demo import main as demo_main

        return demo_main(as_json=args.json)
    return 2


if __name__ == "__main__":
    sys.exit(main())
