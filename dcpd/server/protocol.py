"""The wire protocol: msgpack-encoded, tagged-union messages over ZeroMQ (see docs/PROTOCOL.md).

A client (DEALER) sends one frame per message; the server (ROUTER) sees
[client identity, frame] and answers with one frame per reply. Every message
is a msgpack map with a "type" tag and the protocol version "v".
"""

from __future__ import annotations

from typing import Literal, get_args

import msgspec

PROTOCOL_VERSION = 1


class SamplingOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False


class _Message(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    v: int = PROTOCOL_VERSION


# -- client -> server ------------------------------------------------------------------------------
class Generate(_Message, tag="generate"):
    request_id: str
    prompt_ids: list[int] | None = None
    prompt: str | None = None  # text, tokenized by the server; exactly one of prompt / prompt_ids
    sampling: SamplingOptions = msgspec.field(default_factory=SamplingOptions)
    stream: bool = True  # stream token chunks, or only send the final message


class Abort(_Message, tag="abort"):
    request_id: str


class Health(_Message, tag="health"):
    request_id: str = ""


class GetStats(_Message, tag="stats"):
    request_id: str = ""


ClientMessage = Generate | Abort | Health | GetStats


# -- server -> client ------------------------------------------------------------------------------
class Tokens(_Message, tag="tokens"):
    request_id: str
    seq: int  # 0, 1, 2, ... per request: chunks arrive in order
    token_ids: list[int]
    text: str  # the text these tokens add (UTF-8 safe: held back until complete)


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    total_ms: float


FinishReason = Literal["stop", "length", "abort", "error"]
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)


class Finished(_Message, tag="finished"):
    request_id: str
    finish_reason: FinishReason
    prompt_ids: list[int]  # the prompt as the model saw it (tokenized, for text prompts)
    token_ids: list[int]  # every generated token
    text: str
    usage: Usage
    error: str | None = None


class Error(_Message, tag="error"):
    request_id: str | None
    code: str  # see ERROR_CODES
    message: str


class HealthReply(_Message, tag="health_reply"):
    request_id: str
    status: Literal["serving", "draining"]


class StatsReply(_Message, tag="stats_reply"):
    request_id: str
    stats: dict[str, int | float | str]


ServerMessage = Tokens | Finished | Error | HealthReply | StatsReply

ERROR_CODES = {
    "bad_frames": "the message did not arrive as exactly one frame",
    "bad_message": "undecodable msgpack, an unknown field or a field of the wrong type",
    "unknown_type": "the 'type' tag names no client message",
    "unsupported_version": "the 'v' field is not a protocol version this server speaks",
    "invalid_request": "the request is well-formed but not acceptable (empty or oversize prompt, bad sampling)",
    "duplicate_request_id": "this client already has a request in flight with that id",
    "unknown_request_id": "abort of a request this client does not have in flight",
    "overloaded": "too many requests in flight (for this client or in total); retry later",
    "draining": "the server is shutting down and admits no new requests",
    "aborted": "the request was aborted by the server (shutdown drain budget exceeded)",
    "internal": "the server failed while computing the request",
    "unavailable": "router: no prefill or decode peer (that can hold the request) has served for the grace period",
    "peer_failed": "router: the request's peers failed (died, timed out, or lost the KV) and it could not be retried",
}

_client_decoder = msgspec.msgpack.Decoder(ClientMessage)
_server_decoder = msgspec.msgpack.Decoder(ServerMessage)
_encoder = msgspec.msgpack.Encoder()


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


def encode(message: _Message) -> bytes:
    return _encoder.encode(message)


def _request_id_of(frame: bytes) -> str | None:
    """Best effort: the request_id of an otherwise invalid message, so the error can be addressed."""
    try:
        raw = msgspec.msgpack.decode(frame)
    except msgspec.DecodeError:
        return None
    rid = raw.get("request_id") if isinstance(raw, dict) else None
    return rid if isinstance(rid, str) else None


def decode_client(frame: bytes) -> ClientMessage:
    """Decode one client frame or raise ProtocolError with the code to answer with."""
    try:
        message = _client_decoder.decode(frame)
    except msgspec.ValidationError as exc:
        text = str(exc)
        code = "unknown_type" if "Invalid value" in text and "`$.type`" in text else "bad_message"
        raise ProtocolError(code, text.replace("`$.", "`"), _request_id_of(frame)) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError("bad_message", f"undecodable message: {exc}") from None
    if message.v != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {message.v} is not supported (this server speaks {PROTOCOL_VERSION})",
            getattr(message, "request_id", None),
        )
    return message


def decode_server(frame: bytes) -> ServerMessage:
    return _server_decoder.decode(frame)
