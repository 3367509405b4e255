"""The control protocol between the router and its prefill and decode peers (msgpack, tagged unions).

Each peer connects a DEALER (its routing id = its name) to the router's ROUTER
at `disagg.router_endpoint`; one frame per message. KV bytes never travel here:
they go straight from a prefill peer to a decode peer (see transfer.py).

    peer -> router   Register, Heartbeat, Reserved, Transferring, PrefillDone, Output
    router -> peer   Registered, HeartbeatAck, Reserve, Prefill, Cancel, DropPeer

A request's life, keyed by `key` (the router's id for one attempt of one request):

    router --Reserve--> decode        decode reserves blocks for the prompt (or refuses: full);
                                      with prefill_here, it queues the whole request itself instead
    decode --Reserved--> router
    router --Prefill--> prefill       prefill computes; after each chunk, pushes finished blocks
    prefill --Transferring--> router  (first KV chunk sent)
    prefill ==KV chunks==> decode     the last chunk carries the first token; decode acks it
    prefill --PrefillDone--> router   the ack (ok or not) reached the prefill peer; it freed its blocks
    decode --Output--> router         the first token, then the rest as they are sampled
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

import msgspec
import structlog
import zmq
import zmq.asyncio

from dcpd.disagg.layout import PeerLayout
from dcpd.server.protocol import SamplingOptions

CONTROL_VERSION = 1
CONTROL_HWM = 100_000  # queued control messages per peer before sends fail (they never should)

log = structlog.get_logger("dcpd.control")


def control_socket(context: zmq.asyncio.Context, kind: int) -> zmq.asyncio.Socket:
    """A socket of the control channel (the router's ROUTER, or a peer's DEALER), not yet bound."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, CONTROL_HWM)
    sock.setsockopt(zmq.RCVHWM, CONTROL_HWM)
    return sock


def log_send_failure(what: str) -> Callable[[asyncio.Future], None]:
    """A done-callback for a non-blocking control send: a failure is logged as `what` not sent."""

    def done(future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.warning(f"{what} not sent", error=repr(future.exception()))

    return done


class _Control(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    v: int = CONTROL_VERSION


class PeerLoad(msgspec.Struct, kw_only=True):
    waiting: int  # requests queued in the engine
    running: int  # requests holding blocks in the engine
    kv_blocks_free: int
    kv_blocks_total: int
    kv_blocks_reserve: int  # blocks kept back for running requests (never reserved for new KV)
    draining: bool = False


# -- peer -> router --------------------------------------------------------------------------------
class Register(_Control, tag="register"):
    name: str
    role: Literal["prefill", "decode"]
    layout: PeerLayout
    kv_endpoint: str | None  # decode peers: where prefill peers push KV
    load: PeerLoad
    pid: int
    epoch: int = 0  # +1 each time the peer dropped everything to register again (a fresh start)
    boot: str = ""  # random per process start: a restarted peer with the old pid (PID 1 in a container) is new


class Heartbeat(_Control, tag="heartbeat"):
    load: PeerLoad


class Reserved(_Control, tag="reserved"):
    key: str
    ok: bool
    code: str | None = None  # "kv_full" (try later or elsewhere), "invalid_request", "draining"
    error: str | None = None


class Transferring(_Control, tag="transferring"):
    key: str


class PrefillDone(_Control, tag="prefill_done"):
    key: str
    ok: bool
    bytes: int = 0
    transfer_s: float = 0.0  # first chunk sent -> ack
    error: str | None = None
    # A failure on the decode side: it refused the KV, never acknowledged it, or could not be reached
    # (the router then retries on another decode peer, and may keep this prefill peer).
    decode_side: bool = False


class Output(_Control, tag="output"):
    key: str
    token_ids: list[int]
    finished: bool = False
    reason: str | None = None  # stop | length | abort | error
    error: str | None = None


PeerMessage = Register | Heartbeat | Reserved | Transferring | PrefillDone | Output


# -- router -> peer --------------------------------------------------------------------------------
class Registered(_Control, tag="registered"):
    ok: bool
    error: str | None = None  # why the router refused (mismatched layout, unknown peer: register again)
    fatal: bool = False  # True: do not retry (a configuration problem)


class HeartbeatAck(_Control, tag="heartbeat_ack"):
    pass


class Reserve(_Control, tag="reserve"):
    key: str
    prompt_ids: list[int]
    sampling: SamplingOptions
    prefill_here: bool = False  # conditional disaggregation: the decode peer runs the prefill itself


class Prefill(_Control, tag="prefill"):
    key: str
    prompt_ids: list[int]
    sampling: SamplingOptions
    decode_peer: str
    kv_endpoint: str


class Cancel(_Control, tag="cancel"):
    key: str


class DropPeer(_Control, tag="drop_peer"):
    """A decode peer is gone: prefill peers close their KV connection to it (nothing queued is sent)."""

    kv_endpoint: str


RouterMessage = Registered | HeartbeatAck | Reserve | Prefill | Cancel | DropPeer

_encoder = msgspec.msgpack.Encoder()
_peer_decoder = msgspec.msgpack.Decoder(PeerMessage)
_router_decoder = msgspec.msgpack.Decoder(RouterMessage)


class ControlError(ValueError):
    """An undecodable or unsupported control message."""


def encode(message: _Control) -> bytes:
    return _encoder.encode(message)


def _decode(decoder: msgspec.msgpack.Decoder, frame: bytes) -> _Control:
    try:
        message = decoder.decode(frame)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ControlError(f"bad control message: {str(exc).replace('`$.', '`')}") from None
    if message.v != CONTROL_VERSION:
        raise ControlError(f"control protocol version {message.v} is not supported (we speak {CONTROL_VERSION})")
    return message


def foreign_version(frame: bytes, tag: str) -> int | None:
    """The version of a frame that is a `tag` message of another control protocol version (one we
    cannot decode as ours), else None: so a peer and a router of different versions refuse each other
    with a clear error instead of ignoring each other's messages for ever."""
    try:
        raw = msgspec.msgpack.decode(frame)
    except msgspec.DecodeError:
        return None
    if isinstance(raw, dict) and raw.get("type") == tag and isinstance(raw.get("v"), int):
        return raw["v"] if raw["v"] != CONTROL_VERSION else None
    return None


def decode_peer(frame: bytes) -> PeerMessage:
    return _decode(_peer_decoder, frame)  # type: ignore[return-value]


def decode_router(frame: bytes) -> RouterMessage:
    return _decode(_router_decoder, frame)  # type: ignore[return-value]
