"""Daemon configuration: TOML validated by msgspec, with command-line overrides.

Unknown keys and wrong types are rejected with the key path in the message.
`load_config(path, overrides)` applies `--set section.key=value` (the value is
parsed as a TOML value, else taken as a string) on top of the file, then the
defaults fill the rest.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

EX_CONFIG = 78  # sysexits.h: configuration error (systemd: RestartPreventExitStatus=78)


class ConfigError(ValueError):
    """An invalid configuration; the message is one line naming the key."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class ServerConfig(_Section):
    role: Literal["unified", "prefill", "decode", "router"] = "unified"
    frontend: str = "tcp://127.0.0.1:5557"  # ZMQ ROUTER endpoint clients connect to (tcp:// or ipc://)
    max_inflight: int = 1024  # requests in flight, all clients
    max_inflight_per_client: int = 64  # requests in flight per client identity
    max_message_bytes: int = 1 << 20  # larger frames are refused by ZMQ (MAXMSGSIZE)
    send_hwm: int = 10000  # ZMQ high-water marks (messages queued per peer)
    recv_hwm: int = 10000
    drain_timeout_s: float = 30.0  # on SIGTERM: time given to in-flight requests before they are aborted


class DisaggSection(_Section):
    """Prefill/decode disaggregation: how peers find the router, move KV, and time out."""

    router_endpoint: str = "tcp://127.0.0.1:5558"  # the router binds it; prefill and decode peers connect
    kv_endpoint: str = "tcp://127.0.0.1:5559"  # a decode peer binds it; prefill peers push KV to it
    peer_name: str = ""  # a peer's name at the router; empty = ROLE-HOST-PID
    heartbeat_interval_s: float = 0.5  # peer -> router heartbeats (with load) and router -> peer replies
    peer_timeout_s: float = 5.0  # silence after which the router drops a peer, or a peer its router
    reserve_timeout_s: float = 10.0  # router: a decode peer's answer to a reservation
    prefill_timeout_s: float = 120.0  # router: prefill + KV transfer of one request, from dispatch to ack
    decode_stall_timeout_s: float = 300.0  # router: a decoding request with no output for this long fails
    kv_timeout_s: float = 120.0  # decode: reserved blocks wait this long for their KV, then are freed
    kv_lease_s: float = 120.0  # prefill: KV held for an unacknowledged transfer is freed after this
    queue_timeout_s: float = 60.0  # router: a request waits this long for a decode peer with free blocks
    # router: while a role has no peer serving (none registered, or all draining: a restart), requests wait for
    # one until this long after the last one left (or the router started); then `unavailable`. 0: at once
    peer_return_grace_s: float = 30.0
    max_attempts: int = 3  # router: tries per request (a new pair after a peer fails before any token)
    # Conditional disaggregation (router): prefill on the decode peer itself, skipping the KV transfer,
    local_prefill_max_tokens: int = 0  # for prompts of at most this many tokens (0: never)
    local_prefill_queue: int = 0  # or when every prefill peer has at least this many requests (0: never)
    push_nice: int = 10  # prefill: niceness (0-19) of the KV push thread: where it shares cores, compute goes first


class ModelSection(_Section):
    path: str = ""  # local Hugging Face model directory; empty = the embedded default model
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"


class EngineSection(_Section):
    max_batch_size: int = 256
    max_tokens_per_batch: int = 8192
    block_size: int = 16
    kv_cache_mb: int = 256
    kv_reserve_fraction: float = 0.05
    seed: int = 0
    threads: int = 0  # torch compute threads; 0 = torch's default
    step_timeout_s: float = 600.0  # a step running longer is stuck: the daemon exits 1 (0: never)


class LoggingSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a terminal, else JSON lines


class MetricsSection(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9464  # Prometheus scrape port; 0 = any free port


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    model: ModelSection = msgspec.field(default_factory=ModelSection)
    engine: EngineSection = msgspec.field(default_factory=EngineSection)
    logging: LoggingSection = msgspec.field(default_factory=LoggingSection)
    metrics: MetricsSection = msgspec.field(default_factory=MetricsSection)
    disagg: DisaggSection = msgspec.field(default_factory=DisaggSection)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` override to raw config data."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {assignment!r}: the key must be section.key")
    section = data.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"--set {assignment!r}: {parts[0]} is not a section")
    section[parts[1]] = _parse_value(value.strip())


WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "[::]", "")
EPHEMERAL_PORTS = ("*", "!")  # ZeroMQ's "bind to any free port"


IPC_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL (Linux)


def _tcp_host_port(endpoint: str) -> tuple[str, str] | None:
    """(host, port) of a tcp:// endpoint, else None."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return host, port


def unbindable(endpoint: str) -> str | None:
    """What is wrong with an endpoint to bind, or None."""
    if endpoint.startswith("ipc://"):
        path = endpoint.removeprefix("ipc://")
        if not path:
            return "an ipc endpoint needs a path"
        if (size := len(path.encode())) > IPC_PATH_MAX:
            return f"an ipc path may have at most {IPC_PATH_MAX} bytes (the socket address limit); this has {size}"
        return None
    if (tcp := _tcp_host_port(endpoint)) is None:
        return "must start with tcp:// or ipc://"
    host, port = tcp
    if not host or not (port in EPHEMERAL_PORTS or (port.isdigit() and int(port) <= 65535)):
        return "a tcp endpoint needs host:port, the port a number in [0, 65535] (or * for any free one)"
    return None


def unconnectable(endpoint: str) -> str | None:
    """Why other processes could not connect to this endpoint, or None. A decode peer binds its
    kv_endpoint and also gives it to prefill peers to connect to, so it must name a reachable host."""
    if problem := unbindable(endpoint):
        return problem
    if (tcp := _tcp_host_port(endpoint)) is not None:
        host, port = tcp
        if host in WILDCARD_HOSTS:
            return f"prefill peers connect to this address, so it needs a host they can reach, not {host!r}"
        if port in EPHEMERAL_PORTS:
            return "prefill peers connect to this address, so it needs a fixed port"
    return None


def connectable(endpoint: str) -> str:
    """An address a local client can connect to for a bind endpoint (a wildcard host becomes loopback)."""
    tcp = _tcp_host_port(endpoint)
    if tcp is not None and tcp[0] in WILDCARD_HOSTS:
        return f"tcp://127.0.0.1:{tcp[1]}"
    return endpoint


def _check_values(config: Config) -> None:
    positive = {
        "server.max_inflight": config.server.max_inflight,
        "server.max_inflight_per_client": config.server.max_inflight_per_client,
        "server.max_message_bytes": config.server.max_message_bytes,
        "engine.max_batch_size": config.engine.max_batch_size,
        "engine.max_tokens_per_batch": config.engine.max_tokens_per_batch,
        "engine.block_size": config.engine.block_size,
        "engine.kv_cache_mb": config.engine.kv_cache_mb,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} = {value}: must be >= 1")
    endpoints = {
        "server.frontend": config.server.frontend,
        "disagg.router_endpoint": config.disagg.router_endpoint,
        "disagg.kv_endpoint": config.disagg.kv_endpoint,
    }
    for key, value in endpoints.items():
        if problem := unbindable(value):
            raise ConfigError(f"{key} = {value!r}: {problem}")
    if problem := unconnectable(config.disagg.kv_endpoint):
        raise ConfigError(f"disagg.kv_endpoint = {config.disagg.kv_endpoint!r}: {problem}")
    d = config.disagg
    for key in ("heartbeat_interval_s", "peer_timeout_s", "reserve_timeout_s", "prefill_timeout_s",
                "decode_stall_timeout_s", "kv_timeout_s", "kv_lease_s", "queue_timeout_s"):  # fmt: skip
        if getattr(d, key) <= 0:
            raise ConfigError(f"disagg.{key} = {getattr(d, key)}: must be > 0")
    if d.peer_timeout_s <= 2 * d.heartbeat_interval_s:
        raise ConfigError(
            f"disagg.peer_timeout_s = {d.peer_timeout_s}: must exceed two heartbeat intervals "
            f"({2 * d.heartbeat_interval_s} s)"
        )
    for key in ("local_prefill_max_tokens", "local_prefill_queue", "peer_return_grace_s"):
        if getattr(d, key) < 0:
            raise ConfigError(f"disagg.{key} = {getattr(d, key)}: must be >= 0")
    if not 0 <= d.push_nice <= 19:
        raise ConfigError(f"disagg.push_nice = {d.push_nice}: must be in [0, 19] (a niceness; 0: as the compute)")
    if d.max_attempts < 1:
        raise ConfigError(f"disagg.max_attempts = {d.max_attempts}: must be >= 1")
    if config.engine.step_timeout_s < 0:
        raise ConfigError(f"engine.step_timeout_s = {config.engine.step_timeout_s}: must be >= 0 (0: never)")
    if config.server.drain_timeout_s < 0:
        raise ConfigError(f"server.drain_timeout_s = {config.server.drain_timeout_s}: must be >= 0")
    zero_means = {
        "server.send_hwm": (config.server.send_hwm, "no limit"),
        "server.recv_hwm": (config.server.recv_hwm, "no limit"),
        "engine.threads": (config.engine.threads, "the default"),
    }
    for key, (value, zero) in zero_means.items():
        if value < 0:
            raise ConfigError(f"{key} = {value}: must be >= 0 (0: {zero})")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", config.model.device):
        raise ConfigError(f"model.device = {config.model.device!r}: must be 'cpu', 'cuda' or 'cuda:N'")
    if not 0 <= config.metrics.port < 65536:
        raise ConfigError(f"metrics.port = {config.metrics.port}: must be in [0, 65535]")
    if not 0.0 <= config.engine.kv_reserve_fraction < 1.0:
        raise ConfigError(f"engine.kv_reserve_fraction = {config.engine.kv_reserve_fraction}: must be in [0, 1)")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid TOML ({exc})") from None
        except OSError as exc:  # a directory, no permission
            raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{_friendly(str(exc))}") from None
    _check_values(config)
    return config


def _friendly(message: str) -> str:
    """msgspec says `... - at `$.server.port``; say `server.port` instead."""
    return message.replace("`$.", "`").replace("`$`", "the top level")
