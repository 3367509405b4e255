"""The unified daemon: ZMQ ROUTER frontend + asyncio scheduler loop around the engine.

Threads: the asyncio loop (uvloop) owns the socket, the client bookkeeping and
every engine call except `step()`, which runs in a dedicated single-thread
executor (in a copy of the loop's context, so log context follows). Requests
and aborts that arrive during a step are queued and applied between steps, so
the engine is never touched by two threads at once. The loop keeps serving the
socket while the model computes.
"""

from __future__ import annotations

import asyncio
import contextvars
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog
import zmq
import zmq.asyncio

from dcpd.batch import DCPPlanConfig
from dcpd.config import Config
from dcpd.engine import LLMEngine, RequestError, RequestOutput, SamplingParams
from dcpd.model.loader import LoadedModel
from dcpd.server import protocol as p
from dcpd.server.metrics import Metrics
from dcpd.server.sdnotify import Notifier, watchdog_interval_s

log = structlog.get_logger("dcpd.daemon")


@dataclass
class ClientRequest:
    """The daemon's view of one request: who asked, and what has been sent back."""

    identity: bytes
    request_id: str  # the client's id
    key: str  # the engine's id: unique across clients
    stream: bool
    prompt_ids: list[int]
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    token_ids: list[int] = field(default_factory=list)
    sent_text: str = ""
    seq: int = 0


class Daemon:
    def __init__(self, config: Config, loaded: LoadedModel) -> None:
        self.config = config
        eng = config.engine
        plan_config = DCPPlanConfig(
            max_batch_size=eng.max_batch_size,
            max_tokens_per_batch=eng.max_tokens_per_batch,
            block_size=eng.block_size,
            kv_cache_bytes=eng.kv_cache_mb << 20,
            kv_reserve_fraction=eng.kv_reserve_fraction,
        )
        self.engine = LLMEngine(loaded, plan_config, seed=eng.seed)
        self.tokenizer = loaded.tokenizer
        self.metrics = Metrics()
        self.notifier = Notifier()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcpd-step")
        self.inflight: dict[str, ClientRequest] = {}  # by engine key
        self.per_client: Counter[bytes] = Counter()
        self.pending_adds: list[tuple[ClientRequest, list[int], SamplingParams]] = []
        self.pending_aborts: list[tuple[str, str | None]] = []  # (engine key, error code or None)
        self.work = asyncio.Event()
        self.draining = False
        self.stopped = asyncio.Event()
        self.exit_code = 0
        self.zmq_context = zmq.asyncio.Context()
        self.socket: zmq.asyncio.Socket | None = None
        self.metrics_port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def _open_socket(self) -> None:
        server = self.config.server
        sock = self.zmq_context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # fail loudly instead of dropping replies to gone peers
        sock.setsockopt(zmq.MAXMSGSIZE, server.max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, server.send_hwm)
        sock.setsockopt(zmq.RCVHWM, server.recv_hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(server.frontend)
        self.socket = sock

    async def serve(self, demo: bool = False) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_drain, sig.name)
        try:
            self._open_socket()
        except zmq.ZMQError as exc:
            log.error("cannot bind the frontend", frontend=self.config.server.frontend, error=str(exc))
            self.zmq_context.term()
            return 1
        if self.config.metrics.enabled:
            self.metrics_port = self.metrics.serve(self.config.metrics.host, self.config.metrics.port)
        tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._engine_loop())]
        interval = watchdog_interval_s()
        if interval:
            tasks.append(asyncio.create_task(self._watchdog(interval)))
        for task in tasks:
            task.add_done_callback(self._task_done)
        log.info(
            "serving",
            frontend=self.config.server.frontend,
            metrics_port=self.metrics_port,
            model=self.engine.loaded.source,
            kv_blocks=self.engine.kv_cache.num_blocks,
        )
        self.notifier.notify("READY=1", f"STATUS=serving on {self.config.server.frontend}")
        if demo:
            tasks.append(asyncio.create_task(self._demo_request()))
        await self.stopped.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.socket.close(linger=0)
        self.zmq_context.term()
        self.executor.shutdown(wait=True)
        log.info("stopped", exit_code=self.exit_code)
        return self.exit_code

    def _task_done(self, task: asyncio.Task) -> None:
        """A loop task must never end on its own: if one crashes, exit non-zero (systemd restarts us)."""
        if task.cancelled() or self.stopped.is_set() or (task.get_coro().__name__ == "_demo_request"
                                                          and task.exception() is None):  # fmt: skip
            return
        log.error("internal task died", task=task.get_coro().__name__, error=repr(task.exception()))
        self.exit_code = 1
        self.stopped.set()

    def begin_drain(self, reason: str = "signal") -> None:
        if self.draining:
            return
        self.draining = True
        log.info("draining", reason=reason, inflight=len(self.inflight), budget_s=self.config.server.drain_timeout_s)
        self.notifier.notify("STOPPING=1", f"STATUS=draining {len(self.inflight)} requests")
        asyncio.get_running_loop().call_later(self.config.server.drain_timeout_s, self._drain_deadline)
        self.work.set()

    def _drain_deadline(self) -> None:
        if self.inflight:
            log.warning("drain budget exceeded; aborting", inflight=len(self.inflight))
            for key in list(self.inflight):
                self.pending_aborts.append((key, "aborted"))
            self.work.set()

    async def _demo_request(self) -> None:
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
            self.engine.loaded.source == "embedded-default" else None,
        )  # fmt: skip

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify("WATCHDOG=1")  # sent from the loop: a stalled loop trips the watchdog
            await asyncio.sleep(interval)

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
            self.pending_aborts.append((key, None))
        self.work.set()

    # -- receiving ---------------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
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
            self.pending_aborts.append((key, None))
            self.work.set()
        elif isinstance(message, p.Health):
            status = "draining" if self.draining else "serving"
            self._send(identity, p.HealthReply(request_id=message.request_id, status=status))
        elif isinstance(message, p.GetStats):
            self._send(identity, p.StatsReply(request_id=message.request_id, stats=self.stats()))

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
        s = msg.sampling
        params = SamplingParams(
            max_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
            stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos,
        )  # fmt: skip
        try:
            prompt = msg.prompt_ids if msg.prompt_ids is not None else self.tokenizer.encode(msg.prompt or "")
            prompt = self.engine.validate_request(prompt, params)
        except RequestError as exc:
            return self._send_error(identity, rid, "invalid_request", str(exc))
        request = ClientRequest(identity, rid, key, msg.stream, prompt)
        self.inflight[key] = request
        self.per_client[identity] += 1
        self.pending_adds.append((request, prompt, params))
        self.metrics.tokens_in.inc(len(prompt))
        log.info("admitted", request_id=rid, client=identity.hex(), prompt_tokens=len(prompt), key=key)
        self.work.set()
        return None

    # -- the scheduler loop ------------------------------------------------------------------------
    def _apply_pending(self) -> None:
        """Between steps only: hand queued requests and aborts to the engine."""
        adds, self.pending_adds = self.pending_adds, []
        for request, prompt, params in adds:
            if request.key not in self.inflight:  # aborted meanwhile
                continue
            try:
                self.engine.add_request(prompt, params, request_id=request.key)
            except RequestError as exc:  # validated on arrival; only a bug gets here, and only this request fails
                self._finish(request, "error", error=str(exc), error_code="internal")
        aborts, self.pending_aborts = self.pending_aborts, []
        for key, code in aborts:
            request = self.inflight.get(key)
            if request is None:
                continue
            self.engine.abort_request(key)
            self._finish(request, "abort", error_code=code)

    async def _engine_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._apply_pending()
            self._update_gauges()
            if self.draining and not self.inflight:
                self.stopped.set()
                return
            if not self.engine.has_unfinished():
                self.work.clear()
                if not self.pending_adds and not self.pending_aborts:
                    await self.work.wait()
                continue
            context = contextvars.copy_context()
            try:
                outputs = await loop.run_in_executor(self.executor, context.run, self.engine.step)
            except Exception:  # the engine fails requests itself; this is a bug in the step machinery
                log.exception("engine step failed")
                for key in list(self.inflight):
                    self.pending_aborts.append((key, "internal"))
                continue
            self.metrics.steps.inc()
            if self.engine.last_preempted:
                self.metrics.preemptions.inc(len(self.engine.last_preempted))
                log.info("preempted", requests=self.engine.last_preempted)
            for output in outputs:
                self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        request = self.inflight.get(output.request_id)
        if request is None:
            return
        now = time.monotonic()
        if output.new_token_ids:
            if request.first_token is None:
                request.first_token = now
                self.metrics.ttft.observe(now - request.arrival)
                log.info("first token", request_id=request.request_id, ttft_ms=round((now - request.arrival) * 1e3, 2))
            request.token_ids.extend(output.new_token_ids)
            self.metrics.tokens_out.inc(len(output.new_token_ids))
            if request.stream and not output.finished:
                self._stream(request, output.new_token_ids)
        if output.finished:
            reason = output.finish_reason.value if output.finish_reason else "error"
            if request.stream and output.new_token_ids:
                self._stream(request, output.new_token_ids)
            self._finish(request, reason, error=output.error, error_code="internal" if reason == "error" else None)

    def _stream(self, request: ClientRequest, new_tokens: list[int]) -> None:
        text = self.tokenizer.decode(request.token_ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: hold the text back until it completes
            delta = ""
        else:
            delta, request.sent_text = text[len(request.sent_text) :], text
        chunk = p.Tokens(request_id=request.request_id, seq=request.seq, token_ids=new_tokens, text=delta)
        request.seq += 1
        self._send(request.identity, chunk)

    def _finish(
        self, request: ClientRequest, reason: str, error: str | None = None, error_code: str | None = None
    ) -> None:
        self.inflight.pop(request.key, None)
        self.per_client[request.identity] -= 1
        if self.per_client[request.identity] <= 0:
            del self.per_client[request.identity]
        self.engine.forget(request.key)
        now = time.monotonic()
        ttft = None if request.first_token is None else (request.first_token - request.arrival) * 1e3
        total = (now - request.arrival) * 1e3
        self.metrics.requests.labels(reason).inc()
        self.metrics.e2e.observe(now - request.arrival)
        if request.first_token is not None and len(request.token_ids) > 1:
            self.metrics.tpot.observe((now - request.first_token) / (len(request.token_ids) - 1))
        log.info("finished", request_id=request.request_id, reason=reason, completion_tokens=len(request.token_ids),
                 ttft_ms=None if ttft is None else round(ttft, 2), total_ms=round(total, 2))  # fmt: skip
        if error_code is not None and reason in ("abort", "error"):
            message = error or ("aborted by the server" if error_code == "aborted" else "request failed")
            self._send_error(request.identity, request.request_id, error_code, message)
            return
        usage = p.Usage(prompt_tokens=len(request.prompt_ids), completion_tokens=len(request.token_ids), ttft_ms=ttft,
                        total_ms=total)  # fmt: skip
        final = p.Finished(
            request_id=request.request_id, finish_reason=reason,  # type: ignore[arg-type]
            prompt_ids=request.prompt_ids, token_ids=request.token_ids,
            text=self.tokenizer.decode(request.token_ids), usage=usage, error=error,
        )  # fmt: skip
        self._send(request.identity, final)

    def _update_gauges(self) -> None:
        pool = self.engine.kv_cache.pool
        self.metrics.queue_depth.set(len(self.engine.scheduler.waiting) + len(self.pending_adds))
        self.metrics.running.set(len(self.engine.scheduler.running))
        self.metrics.kv_used.set(pool.num_used)
        self.metrics.kv_free.set(pool.num_free)

    def stats(self) -> dict[str, int | float | str]:
        pool = self.engine.kv_cache.pool
        return {
            "status": "draining" if self.draining else "serving",
            "inflight": len(self.inflight),
            "waiting": len(self.engine.scheduler.waiting) + len(self.pending_adds),
            "running": len(self.engine.scheduler.running),
            "kv_blocks_total": pool.num_blocks,
            "kv_blocks_free": pool.num_free,
            "steps": self.engine.num_steps,
        }
