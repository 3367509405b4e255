"""`dcpd serve` and `dcpd check-config`: load the config, then run the daemon under uvloop."""

from __future__ import annotations

import argparse
import json
import sys

from dcpd.config import EX_CONFIG, Config, ConfigError, load_config


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (default: built-in defaults)")
    parser.add_argument("--model", help="model directory (overrides model.path)")
    parser.add_argument("--frontend", help="ZMQ endpoint to bind (overrides server.frontend)")
    parser.add_argument(
        "--role", choices=["unified", "prefill", "decode", "router"], help="daemon role (overrides server.role)"
    )
    parser.add_argument(
        "--demo", action="store_true", help="once serving, answer a demo request from a client and log it"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a key"
    )


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    for key, value in (("model.path", args.model), ("server.frontend", args.frontend), ("server.role", args.role)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")  # a JSON string is a valid TOML string
    return load_config(args.config, overrides)


def serve(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"dcpd: bad config: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.demo and config.server.role != "unified":
        print("dcpd: --demo needs the unified role (for a cluster: `dcpd cluster`, then `dcpd generate`)",
              file=sys.stderr)  # fmt: skip
        return 2
    import torch
    import uvloop

    from dcpd.kv.cache import KVCacheAllocationError
    from dcpd.model.config import ModelLoadError
    from dcpd.offline import load
    from dcpd.server.daemon import Daemon
    from dcpd.server.logs import configure_logging

    process_fields = {} if config.server.role == "unified" else {"role": config.server.role}
    if config.server.role in ("prefill", "decode") or (process_fields and config.disagg.peer_name):
        from dcpd.disagg.peer import peer_name

        process_fields["peer"] = peer_name(config)  # as the router knows it (ROLE-HOST-PID by default)
    configure_logging(config.logging.level, config.logging.format, process_fields)
    if config.engine.threads:
        torch.set_num_threads(config.engine.threads)
    # Not 78: a driver not up yet at boot, or memory another process holds for a moment, may pass.
    if config.server.role != "router" and (problem := _device_problem(config.model.device)):  # routers compute nothing
        print(f"dcpd: model.device = {config.model.device!r}: {problem}", file=sys.stderr)
        return 1
    role = config.server.role
    try:
        if role == "router":
            from dcpd.disagg.router import Router
            from dcpd.model.loader import load_model_spec

            daemon = Router(config, load_model_spec(config.model.path or None))
        else:
            loaded = load(config.model.path or None, config.model.dtype, config.model.device)
            if role == "prefill":
                from dcpd.disagg.prefill import PrefillPeer

                daemon = PrefillPeer(config, loaded)
            elif role == "decode":
                from dcpd.disagg.decode import DecodePeer

                daemon = DecodePeer(config, loaded)
            else:
                daemon = Daemon(config, loaded)
    except ModelLoadError as exc:
        print(f"dcpd: bad config: model: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KVCacheAllocationError as exc:
        print(f"dcpd: engine.kv_cache_mb = {config.engine.kv_cache_mb}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"dcpd: bad config: {exc}", file=sys.stderr)
        return EX_CONFIG
    demo = [daemon.demo_request()] if args.demo else None
    return uvloop.run(daemon.serve(demo))


def model_problem(path: str) -> str | None:
    """What is wrong with a model directory (its config.json and tokenizer; no weights are read), or None."""
    from dcpd.model.config import ModelLoadError
    from dcpd.model.loader import load_model_spec

    try:
        load_model_spec(path)
    except ModelLoadError as exc:
        return str(exc)
    return None


def _device_problem(device: str) -> str | None:
    """Why this torch cannot use `device` ('cpu', 'cuda' or 'cuda:N'), or None."""
    import torch

    if device == "cpu":
        return None
    if not torch.cuda.is_available():
        return "this torch build or machine has no usable CUDA device"
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        return f"there are {torch.cuda.device_count()} CUDA devices"
    return None


def check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"dcpd: bad config: {exc}", file=sys.stderr)
        return EX_CONFIG
    if config.model.path and (problem := model_problem(config.model.path)):
        print(f"dcpd: bad config: model: {problem}", file=sys.stderr)
        return EX_CONFIG
    print(f"{args.file}: OK")
    return 0
