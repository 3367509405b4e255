"""The `dcpd` command line."""

from __future__ import annotations

import argparse
import sys

from dcpd.disagg.cluster import add_arguments as add_cluster_arguments
from dcpd.disagg.cluster import run as run_cluster
from dcpd.generate_cli import add_arguments as add_generate_arguments
from dcpd.generate_cli import run as run_generate
from dcpd.offline import add_arguments
from dcpd.offline import run as run_offline
from dcpd.server.main import add_serve_arguments, check_config, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcpd", description="Disaggregated LLM serving with decode context parallelism"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the attention engine on a small continuous batch and check it against SDPA")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    run = sub.add_parser("run", help="generate offline: every prompt concurrently, results in input order")
    add_arguments(run)
    serve = sub.add_parser("serve", help="run the daemon")
    add_serve_arguments(serve)
    generate = sub.add_parser("generate", help="send prompts to a running daemon")
    add_generate_arguments(generate)
    cluster = sub.add_parser("cluster", help="run a router with N prefill and M decode daemons on this host")
    add_cluster_arguments(cluster)
    check = sub.add_parser("check-config", help="validate a TOML config file without starting (exit 78 if bad)")
    check.add_argument("file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from dcpd.demo import main as demo_main

        return demo_main(as_json=args.json)
    if args.command == "run":
        return run_offline(args)
    if args.command == "serve":
        return serve(args)
    if args.command == "generate":
        return run_generate(args)
    if args.command == "cluster":
        return run_cluster(args)
    if args.command == "check-config":
        return check_config(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
