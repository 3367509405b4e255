"""The client-facing half of a daemon: the ZMQ ROUTER frontend, client bookkeeping and replies.

The unified daemon and the router share it, so clients cannot tell them apart.
A subclass says how a request is checked (`validate`), started (`submit`) and
stopped (`cancel`); it reports progress with `deliver()`. Every request ends in
exactly one `Finished` or `Error`, sent by `finish()`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import structlog
import zmq

from dcpd.config import Config
from dcpd.engine import RequestError, SamplingParams
from dcpd.model.tokenizer import Tokenizer
from dcpd.server import protocol as p
from dcpd.server.endpoint import bind, close_socket
from dcpd.server.service import Service

log = structlog.get_logger("dcpd.frontend")


@dataclass
class ClientRequest:
    """The daemon's view of one request: who asked, and what has been sent back."""

    identity: bytes
    request_id: str  # the client's id
    key: str  # the daemon's id: unique across clients
    stream: bool
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    token_ids: list[int] = field(default_factory=list)
    sent_text: str = ""
    seq: int = 0


def sampling_params(options: p.SamplingOptions) -> SamplingParams:
    s = options
    return SamplingParams(
        max_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
        stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos,
    )  # fmt: skip


class Frontend(Service):
    def __init__(self, config: Config, tokenizer: Tokenizer, model_source: str) -> None:
        super().__init__(config)
        self.tokenizer = tokenizer
        self.model_source = model_source
        self.inflight: dict[str, ClientRequest] = {}  # by key
        self.per_client: Counter[bytes] = Counter()
        self.socket: zmq.asyncio.Socket | None = None

    # -- what a subclass provides -------------------------------------------------------------------
    def validate(self, prompt: list[int], params: SamplingParams) -> list[int]:
        """Check a request (raise RequestError naming the problem); returns the prompt to run."""
        raise NotImplementedError

    def submit(self, request: ClientRequest) -> None:
        """Start an admitted request."""
        raise NotImplementedError

    def cancel(self, key: str, code: str | None) -> None:
        """Stop a request and free what it holds, then `finish()` it (abort; `code` set: as that error)."""
        raise NotImplementedError

    # -- lifecycle ----------------------------------------------------------------------------------
    def open(self) -> None:
        server = self.config.server
        sock = self.zmq_context.socket(zmq.ROUTER)
        self.socket = sock  # closed by close() even when an option or the bind fails
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # fail loudly instead of dropping replies to gone peers
        sock.setsockopt(zmq.MAXMSGSIZE, server.max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, server.send_hwm)
        sock.setsockopt(zmq.RCVHWM, server.recv_hwm)
        sock.setsockopt(zmq.LINGER, 0)
        bind(sock, server.frontend)

    def close(self) -> None:
        if self.socket is not None:
            close_socket(self.socket, linger=1000)  # the last replies of a drain are on their way: let them leave

    def describe(self) -> dict[str, object]:
        return {"frontend": self.config.server.frontend, "model": self.model_source}

    def on_drain(self) -> None:
        self.notifier.notify(f"STATUS=draining {len(self.inflight)} requests")
        self.check_drained()

    def check_drained(self) -> None:
        if self.draining and not self.inflight:
            self.stopped.set()

    def on_drain_deadline(self) -> None:
        if self.inflight:
            log.warning("drain budget exceeded; aborting", inflight=len(self.inflight))
            for key in list(self.inflight):
                self.cancel(key, "aborted")

    async def demo_request(self) -> None:
        """Answer one demo request from a real client over the frontend, and print it."""
        from dcpd.client import AsyncClient

        async with AsyncClient(self.config.server.frontend, timeout=120) as client:
            stream = await client.generate(prompt="Hello from dcpd!", max_tokens=24, temperature=0.0, ignore_eos=True)
            result = await stream.collect()
        log.info(
            "demo request answered",
            prompt="Hello from dcpd!",
            token_ids=result.token_ids,
            text=result.text,
            ttft_ms=result.usage.ttft_ms,
            total_ms=round(result.usage.total_ms, 2),
            note="the embedded default model has random weights: its text is meaningless" if
            self.model_source == "embedded-default" else None,
        )  # fmt: skip

    # -- sending -----------------------------------------------------------------------------------
    def _send(self, identity: bytes, message: p._Message) -> None:
        """Send one reply without blocking; on a gone or hopelessly slow client, abort its requests.

        The asyncio socket reports a failed send on the returned future (with NOBLOCK
        it is normally already done), never by raising here.
        """
        future = self.socket.send_multipart([identity, p.encode(message)], flags=zmq.NOBLOCK)
        if future.done():
            self._sent(identity, future)
        else:
            future.add_done_callback(lambda f: self._sent(identity, f))

    def _sent(self, identity: bytes, future: asyncio.Future) -> None:
        exc = None if future.cancelled() else future.exception()
        if exc is None:
            return
        if isinstance(exc, zmq.ZMQError) and exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
            self._client_gone(identity, "unreachable" if exc.errno == zmq.EHOSTUNREACH else "too slow")
        else:
            log.error("send failed", client=identity.hex(), error=repr(exc))

    def _send_error(self, identity: bytes, request_id: str | None, code: str, message: str) -> None:
        self.metrics.errors.labels(code).inc()
        log.warning("request rejected", client=identity.hex(), request_id=request_id, code=code, message=message)
        self._send(identity, p.Error(request_id=request_id, code=code, message=message))

    def _client_gone(self, identity: bytes, why: str) -> None:
        keys = [key for key, req in self.inflight.items() if req.identity == identity]
        if keys:
            log.warning("client gone; aborting its requests", client=identity.hex(), why=why, requests=len(keys))
        for key in keys:
            if key in self.inflight:
                self.cancel(key, None)

    # -- receiving ---------------------------------------------------------------------------------
    async def receive_loop(self) -> None:
        while True:
            frames = await self.socket.recv_multipart()
            identity = frames[0]
            if len(frames) != 2:
                self._send_error(identity, None, "bad_frames", f"expected 1 frame per message, got {len(frames) - 1}")
                continue
            try:
                message = p.decode_client(frames[1])
            except p.ProtocolError as exc:
                self._send_error(identity, exc.request_id, exc.code, str(exc))
                continue
            try:
                self._handle(identity, message)
            except Exception as exc:  # a bug handling one message must not stop the daemon
                log.exception("failed to handle a message", client=identity.hex())
                self._send_error(identity, getattr(message, "request_id", None), "internal", repr(exc))

    def _handle(self, identity: bytes, message: p.ClientMessage) -> None:
        if isinstance(message, p.Generate):
            self._admit(identity, message)
        elif isinstance(message, p.Abort):
            key = self._key(identity, message.request_id)
            if key not in self.inflight:
                self._send_error(identity, message.request_id, "unknown_request_id", "no such request in flight")
                return
            self.cancel(key, None)
        elif isinstance(message, p.Health):
            status = "draining" if self.draining else "serving"
            self._send(identity, p.HealthReply(request_id=message.request_id, status=status))
        elif isinstance(message, p.GetStats):
            self._send(identity, p.StatsReply(request_id=message.request_id, stats=self.stats()))

    def stats(self) -> dict[str, int | float | str]:
        return {"status": "draining" if self.draining else "serving", "inflight": len(self.inflight)}

    @staticmethod
    def _key(identity: bytes, request_id: str) -> str:
        return f"{identity.hex()}/{request_id}"

    def _admit(self, identity: bytes, msg: p.Generate) -> None:
        rid = msg.request_id
        server = self.config.server
        if self.draining:
            return self._send_error(identity, rid, "draining", "the server is shutting down")
        key = self._key(identity, rid)
        if key in self.inflight:
            return self._send_error(identity, rid, "duplicate_request_id", f"request {rid!r} is already in flight")
        if len(self.inflight) >= server.max_inflight:
            return self._send_error(identity, rid, "overloaded", f"{len(self.inflight)} requests in flight (limit)")
        if self.per_client[identity] >= server.max_inflight_per_client:
            limit = server.max_inflight_per_client
            return self._send_error(identity, rid, "overloaded", f"this client has {limit} requests in flight (limit)")
        if (msg.prompt is None) == (msg.prompt_ids is None):
            return self._send_error(identity, rid, "invalid_request", "give exactly one of prompt or prompt_ids")
        params = sampling_params(msg.sampling)
        try:
            prompt = msg.prompt_ids if msg.prompt_ids is not None else self.tokenizer.encode(msg.prompt or "")
            prompt = self.validate(prompt, params)
        except RequestError as exc:
            return self._send_error(identity, rid, "invalid_request", str(exc))
        request = ClientRequest(identity, rid, key, msg.stream, prompt, params)
        self.inflight[key] = request
        self.per_client[identity] += 1
        self.metrics.tokens_in.inc(len(prompt))
        log.info("admitted", request_id=rid, client=identity.hex(), prompt_tokens=len(prompt), key=key)
        self.submit(request)
        return None

    def on_step_stuck(self) -> None:
        why = "the engine step is stuck; the server is exiting"
        for request in list(self.inflight.values()):
            self.finish(request, "error", error=why, error_code="internal")

    # -- replies -------------------------------------------------------------------------------------
    def deliver(
        self, key: str, new_token_ids: list[int], finished: bool, reason: str | None, error: str | None = None
    ) -> None:
        """Tokens (and possibly the end) of a request: stream them, and finish it when it is done."""
        request = self.inflight.get(key)
        if request is None:
            return
        now = time.monotonic()
        if new_token_ids:
            if request.first_token is None:
                request.first_token = now
                self.metrics.ttft.observe(now - request.arrival)
                log.info("first token", request_id=request.request_id, ttft_ms=round((now - request.arrival) * 1e3, 2))
            request.token_ids.extend(new_token_ids)
            self.metrics.tokens_out.inc(len(new_token_ids))
            if request.stream:
                self._stream(request, new_token_ids)
        if finished:
            reason = reason or "error"
            self.finish(request, reason, error=error, error_code="internal" if reason == "error" else None)

    def _stream(self, request: ClientRequest, new_tokens: list[int]) -> None:
        text = self.tokenizer.decode(request.token_ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: hold the text back until it completes
            delta = ""
        else:
            delta, request.sent_text = text[len(request.sent_text) :], text
        chunk = p.Tokens(request_id=request.request_id, seq=request.seq, token_ids=new_tokens, text=delta)
        request.seq += 1
        self._send(request.identity, chunk)

    def finish(
        self, request: ClientRequest, reason: str, error: str | None = None, error_code: str | None = None
    ) -> None:
        """The one place a request ends: a `Finished` reply, or an `Error` when `error_code` is given."""
        if self.inflight.pop(request.key, None) is None:
            return
        self.per_client[request.identity] -= 1
        if self.per_client[request.identity] <= 0:
            del self.per_client[request.identity]
        now = time.monotonic()
        ttft = None if request.first_token is None else (request.first_token - request.arrival) * 1e3
        total = (now - request.arrival) * 1e3
        self.metrics.requests.labels(reason).inc()
        self.metrics.e2e.observe(now - request.arrival)
        if request.first_token is not None and len(request.token_ids) > 1:
            self.metrics.tpot.observe((now - request.first_token) / (len(request.token_ids) - 1))
        log.info("finished", request_id=request.request_id, reason=reason, completion_tokens=len(request.token_ids),
                 ttft_ms=None if ttft is None else round(ttft, 2), total_ms=round(total, 2),
                 error_code=error_code)  # fmt: skip
        if error_code is not None and reason in ("abort", "error"):
            message = error or ("aborted by the server" if error_code == "aborted" else "request failed")
            self._send_error(request.identity, request.request_id, error_code, message)
        else:
            usage = p.Usage(prompt_tokens=len(request.prompt_ids), completion_tokens=len(request.token_ids),
                            ttft_ms=ttft, total_ms=total)  # fmt: skip
            final = p.Finished(
                request_id=request.request_id, finish_reason=reason,  # type: ignore[arg-type]
                prompt_ids=request.prompt_ids, token_ids=request.token_ids,
                text=self.tokenizer.decode(request.token_ids), usage=usage, error=error,
            )  # fmt: skip
            self._send(request.identity, final)
        self.check_drained()
