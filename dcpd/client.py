"""Clients for the dcpd daemon: `AsyncClient` (asyncio) and `Client` (blocking).

Both speak the protocol of docs/PROTOCOL.md over one ZMQ DEALER socket and
demultiplex replies by request id, so many requests can share a socket.

    async with AsyncClient("tcp://127.0.0.1:5557") as client:
        stream = await client.generate(prompt_ids=[1, 2, 3], max_tokens=16, temperature=0.0)
        async for chunk in stream:
            print(chunk.text, end="")
        result = stream.result          # the Finished message

    with Client("tcp://127.0.0.1:5557") as client:
        result = client.generate(prompt="Hello", max_tokens=8).result()
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import zmq
import zmq.asyncio

from dcpd.server import protocol as p


class DcpdError(Exception):
    """Base class of client-side errors."""


class ServerError(DcpdError):
    """The server answered with an Error message."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class Overloaded(ServerError):
    """Too many requests in flight; retry later."""


class RequestTimeout(DcpdError, TimeoutError):
    """No reply within the client's timeout."""


def _raise_for(error: p.Error) -> None:
    cls = Overloaded if error.code == "overloaded" else ServerError
    raise cls(error.code, error.message, error.request_id)


def _generate_message(
    request_id: str, prompt: str | None, prompt_ids: list[int] | None, stream: bool, sampling: dict[str, Any]
) -> p.Generate:
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("give exactly one of prompt or prompt_ids")
    return p.Generate(
        request_id=request_id, prompt=prompt, prompt_ids=prompt_ids, stream=stream,
        sampling=p.SamplingOptions(**sampling),
    )  # fmt: skip


def _new_socket(context: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"dcpd-" + os.urandom(8).hex().encode())
    sock.connect(endpoint)
    return sock


# -- asyncio --------------------------------------------------------------------------------------
class AsyncStream:
    """Token chunks of one request as they arrive; `.result` holds the Finished message afterwards."""

    def __init__(self, client: AsyncClient, request_id: str) -> None:
        self.client = client
        self.request_id = request_id
        self.queue: asyncio.Queue[p.ServerMessage] = asyncio.Queue()
        self.result: p.Finished | None = None

    def __aiter__(self) -> AsyncIterator[p.Tokens]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[p.Tokens]:
        # The reader unregisters the stream when its last message arrives, so a consumer may stop
        # iterating early (say, to abort) and still `collect()` the final message afterwards.
        while True:
            try:
                message = await asyncio.wait_for(self.queue.get(), self.client.timeout)
            except TimeoutError:
                self.client._streams.pop(self.request_id, None)
                raise RequestTimeout(f"request {self.request_id!r}: no reply in {self.client.timeout} s") from None
            if isinstance(message, p.Tokens):
                yield message
            elif isinstance(message, p.Finished):
                self.result = message
                return
            elif isinstance(message, p.Error):
                _raise_for(message)

    async def collect(self) -> p.Finished:
        """The Finished message (drains the rest of the stream, if it was not iterated to the end)."""
        if self.result is None:
            async for _ in self:
                pass
        assert self.result is not None
        return self.result

    async def abort(self) -> None:
        await self.client.abort(self.request_id)


class AsyncClient:
    """`context`: share one zmq.asyncio.Context (one I/O thread) among many clients; owned if omitted."""

    def __init__(self, endpoint: str, *, timeout: float = 60.0, context: zmq.asyncio.Context | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._owns_context = context is None
        self.context = context or zmq.asyncio.Context()
        self.socket = _new_socket(self.context, endpoint)
        self._streams: dict[str, AsyncStream] = {}
        self._replies: dict[str, asyncio.Future] = {}
        self._ids = itertools.count()
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self.socket.close(linger=0)
        if self._owns_context:
            self.context.term()

    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:  # the one long-lived receiver of this socket
            message = p.decode_server(await self.socket.recv())
            rid = message.request_id or ""
            if rid in self._streams:
                self._streams[rid].queue.put_nowait(message)
                if isinstance(message, (p.Finished, p.Error)):  # the request's last message
                    del self._streams[rid]
            elif rid in self._replies and not self._replies[rid].done():
                self._replies[rid].set_result(message)

    async def generate(
        self, *, prompt: str | None = None, prompt_ids: list[int] | None = None, request_id: str | None = None,
        stream: bool = True, **sampling: Any,
    ) -> AsyncStream:  # fmt: skip
        """Send a Generate; returns an AsyncStream (iterate for chunks, then `.result`)."""
        rid = request_id or f"r{next(self._ids)}-{os.urandom(3).hex()}"
        message = _generate_message(rid, prompt, prompt_ids, stream, sampling)
        self._ensure_reader()
        handle = AsyncStream(self, rid)
        self._streams[rid] = handle
        await self.socket.send(p.encode(message))
        return handle

    async def abort(self, request_id: str) -> None:
        await self.socket.send(p.encode(p.Abort(request_id=request_id)))

    async def _ask(self, message: p._Message, rid: str) -> p.ServerMessage:
        self._ensure_reader()
        future = asyncio.get_running_loop().create_future()
        self._replies[rid] = future
        try:
            await self.socket.send(p.encode(message))
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise RequestTimeout(f"no reply to {type(message).__name__} in {self.timeout} s") from None
        finally:
            self._replies.pop(rid, None)

    async def health(self) -> str:
        rid = f"h{next(self._ids)}"
        reply = await self._ask(p.Health(request_id=rid), rid)
        return reply.status  # type: ignore[union-attr]

    async def stats(self) -> dict[str, Any]:
        rid = f"s{next(self._ids)}"
        reply = await self._ask(p.GetStats(request_id=rid), rid)
        return reply.stats  # type: ignore[union-attr]


# -- blocking -------------------------------------------------------------------------------------
class Stream:
    """Blocking counterpart of AsyncStream: iterate for chunks, or call `.result()`."""

    def __init__(self, client: Client, request_id: str) -> None:
        self.client = client
        self.request_id = request_id
        self.finished: p.Finished | None = None

    def __iter__(self) -> Iterator[p.Tokens]:
        while self.finished is None:
            message = self.client._next_for(self.request_id)
            if isinstance(message, p.Tokens):
                yield message
            elif isinstance(message, p.Finished):
                self.finished = message
            elif isinstance(message, p.Error):
                _raise_for(message)

    def result(self) -> p.Finished:
        for _ in self:
            pass
        assert self.finished is not None
        return self.finished

    def abort(self) -> None:
        self.client.abort(self.request_id)


class Client:
    def __init__(self, endpoint: str, *, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.context = zmq.Context()
        self.socket = _new_socket(self.context, endpoint)
        self._buffered: dict[str, deque[p.ServerMessage]] = {}
        self._ids = itertools.count()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()

    def _next_for(self, request_id: str) -> p.ServerMessage:
        """The next message for this request id, buffering those for other ids."""
        queue = self._buffered.setdefault(request_id, deque())
        deadline = time.monotonic() + self.timeout
        while not queue:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.socket.poll(int(remaining * 1000)):
                raise RequestTimeout(f"request {request_id!r}: no reply in {self.timeout} s")
            message = p.decode_server(self.socket.recv())
            self._buffered.setdefault(message.request_id or "", deque()).append(message)
        message = queue.popleft()
        if isinstance(message, (p.Finished, p.Error, p.HealthReply, p.StatsReply)) and not queue:
            self._buffered.pop(request_id, None)
        return message

    def generate(
        self, *, prompt: str | None = None, prompt_ids: list[int] | None = None, request_id: str | None = None,
        stream: bool = True, **sampling: Any,
    ) -> Stream:  # fmt: skip
        rid = request_id or f"r{next(self._ids)}-{os.urandom(3).hex()}"
        self.socket.send(p.encode(_generate_message(rid, prompt, prompt_ids, stream, sampling)))
        return Stream(self, rid)

    def abort(self, request_id: str) -> None:
        self.socket.send(p.encode(p.Abort(request_id=request_id)))

    def _ask(self, message: p.Health | p.GetStats) -> p.ServerMessage:
        self.socket.send(p.encode(message))
        reply = self._next_for(message.request_id)
        if isinstance(reply, p.Error):
            _raise_for(reply)
        return reply

    def health(self) -> str:
        return self._ask(p.Health(request_id=f"h{next(self._ids)}")).status  # type: ignore[union-attr]

    def stats(self) -> dict[str, Any]:
        return self._ask(p.GetStats(request_id=f"s{next(self._ids)}")).stats  # type: ignore[union-attr]
