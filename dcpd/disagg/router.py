"""The router: the client frontend of a disaggregated cluster.

Clients speak the same protocol as to a unified daemon. Behind it, prefill and
decode peers register on `disagg.router_endpoint` and send heartbeats with
their load; a peer silent for `peer_timeout_s` is dropped. Per request the
router picks a decode peer with room for the prompt's KV (the most free blocks)
and asks it to reserve them; then it picks the least loaded prefill peer and
sends it the prompt with the decode peer's KV endpoint. Tokens come from the
decode peer and are relayed to the client.

Failures: every attempt has a key of its own (`client key#attempt@boot.n`: unique
for this router's life and across its restarts, even when a client reuses a
request id), so late messages of a dead attempt are recognised and ignored. A peer that dies, a
stage that times out, or a failed KV transfer ends the attempt: both its peers
are told to cancel (freeing their blocks) and, if no token reached the client
yet, the request starts again on a new pair (up to `max_attempts`); otherwise the
client gets an `Error`.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import secrets
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq

from dcpd.config import Config, unconnectable
from dcpd.disagg import messages as m
from dcpd.disagg.layout import PeerLayout, PeerMismatch, check_compatible
from dcpd.engine import RequestError, SamplingParams
from dcpd.engine.request import check_prompt
from dcpd.model.loader import ModelSpec
from dcpd.server import protocol as p
from dcpd.server.endpoint import bind, close_socket
from dcpd.server.frontend import ClientRequest, Frontend

log = structlog.get_logger("dcpd.router")


ROLES = ("prefill", "decode")
TICK_S = 0.02  # how often timeouts, dead peers and the queue are checked


class Stage(enum.Enum):
    WAITING_FOR_RESERVATION = "waiting_for_reservation"  # queued for a decode peer, or Reserve sent
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    WAITING_FOR_KV = "waiting_for_kv"  # prefill acknowledged; the decode peer is adopting the request
    DECODING = "decoding"


@dataclass
class Peer:
    name: str
    role: str
    identity: bytes
    kv_endpoint: str | None
    load: m.PeerLoad
    pid: int
    epoch: int
    boot: str
    last_seen: float = field(default_factory=time.monotonic)
    keys: set[str] = field(default_factory=set)  # attempts this peer works on
    full_until: float = 0.0  # refused a reservation (full): skip it until its next heartbeat
    # decode: a KV transfer to it failed on its side (unreachable, refused): new requests go elsewhere
    # until then, unless no other decode peer has room
    avoid_until: float = 0.0


@dataclass
class Route:
    request: ClientRequest
    sampling: p.SamplingOptions
    blocks: int  # KV blocks of the prompt
    arrival: int = 0  # admission order: the queue is kept in it
    attempt: int = 0
    key: str = ""
    stage: Stage = Stage.WAITING_FOR_RESERVATION
    since: float = field(default_factory=time.monotonic)
    deadline: float = float("inf")
    decode: str | None = None
    prefill: str | None = None
    queued: bool = False
    queued_since: float = 0.0
    local: bool = False  # conditional disaggregation: this attempt prefills on its decode peer
    failed_peers: set[str] = field(default_factory=set)  # peers an earlier attempt failed on (avoided)


class Router(Frontend):
    def __init__(self, config: Config, spec: ModelSpec) -> None:
        super().__init__(config, spec.tokenizer, spec.source)
        self.model_config = spec.config
        self.layout = PeerLayout.expected(spec.config, block_size=config.engine.block_size, dtype=config.model.dtype)
        self.block_size = config.engine.block_size
        self.peers: dict[str, Peer] = {}
        self.routes: dict[str, Route] = {}  # by attempt key
        self.by_client: dict[str, Route] = {}  # by client key
        self.queue: deque[Route] = deque()
        self.peer_socket: zmq.asyncio.Socket | None = None
        # Attempt keys: a client may reuse a request id once the first request ended, while its peers
        # still hold state under the old attempt's key; a restarted router must not meet its own keys.
        self.boot = secrets.token_hex(4)
        self.attempt_numbers = itertools.count(1)
        self.arrivals = itertools.count()
        # When each role last had a peer registered, draining ones included (the router's start counts): for
        # peer_return_grace_s after, requests wait for a live one to register (a restart) instead of ending.
        self.role_seen_at = dict.fromkeys(ROLES, time.monotonic())
        self.roles_missing = set(ROLES)  # as of the last tick (logged when a role goes)
        # Decode peers dropped less than peer_return_grace_s ago, with their last load: a request only such
        # a peer can hold waits for it to come back (a restart) instead of being refused.
        self.departed: dict[str, tuple[float, m.PeerLoad]] = {}

    # -- lifecycle ----------------------------------------------------------------------------------
    def open(self) -> None:
        super().open()
        sock = m.control_socket(self.zmq_context, zmq.ROUTER)
        self.peer_socket = sock  # closed by close() even when an option or the bind fails
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a dead peer fails at once
        # A restarted peer connects with its old name before we notice the old connection is gone: the
        # new connection takes the name over (without this, libzmq drops it and its Register is lost).
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.server.max_message_bytes)  # peers send only small messages
        bind(sock, self.config.disagg.router_endpoint)

    def close(self) -> None:
        super().close()
        if self.peer_socket is not None:
            close_socket(self.peer_socket, linger=1000)  # let the last Cancels reach the peers

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "router_endpoint": self.config.disagg.router_endpoint}

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        return [self.receive_loop(), self._peer_loop(), self._tick_loop()]

    # -- Frontend hooks -----------------------------------------------------------------------------
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def validate(self, prompt: list[int], params: SamplingParams) -> list[int]:
        config = self.model_config
        prompt = check_prompt(prompt, params, vocab_size=config.vocab_size,
                              max_model_len=config.max_position_embeddings)  # fmt: skip
        if problem := self._too_big(len(prompt), params.max_tokens):
            raise RequestError(problem)
        return prompt

    def _too_big(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why no decode peer could ever take such a request: none registered (draining ones included:
        they come back), nor dropped within peer_return_grace_s (it may come back). None if one could,
        or if there is none at all (then the request is told that instead)."""
        whole, reserved = self._blocks_for(prompt_tokens + max_tokens), self._blocks_for(prompt_tokens)
        loads = [peer.load for peer in self.peers.values() if peer.role == "decode"]
        if not loads:
            return None
        loads += [load for _, load in self.departed.values()]
        if any(self._can_hold(load, reserved, whole) for load in loads):
            return None
        load = max(loads, key=lambda load: (self._reservable(load), load.kv_blocks_total))
        return (
            f"prompt + max_tokens = {prompt_tokens + max_tokens} tokens needs {whole} KV blocks, "
            f"{reserved} of them reserved up front for the prompt; the largest decode peer has "
            f"{load.kv_blocks_total}, of which it reserves at most {self._reservable(load)} (the other "
            f"{load.kv_blocks_reserve} are kept for running requests to grow into)"
        )

    @staticmethod
    def _reservable(load: m.PeerLoad) -> int:
        """The most blocks a decode peer reserves for one prompt (never its reserve)."""
        return load.kv_blocks_total - load.kv_blocks_reserve

    def _can_hold(self, load: m.PeerLoad, prompt_blocks: int, whole_blocks: int) -> bool:
        """Whether a decode peer could ever take a request: reserve its prompt, and hold all of it as it grows."""
        return prompt_blocks <= self._reservable(load) and whole_blocks <= load.kv_blocks_total

    def submit(self, request: ClientRequest) -> None:
        sampling = self._sampling_options(request.params)
        route = Route(request, sampling, self._blocks_for(len(request.prompt_ids)), next(self.arrivals))
        self.by_client[request.key] = route
        if problem := self._unavailable(route):
            self._end(route, "error", "unavailable", problem)
            return
        self._start_attempt(route)
        self._serve_queue()
        if route.queued:
            log.info("queued for a decode peer", key=route.key, blocks=route.blocks,
                     waiting_for=self._missing_roles(route) or None)  # fmt: skip

    def cancel(self, key: str, code: str | None) -> None:
        route = self.by_client.get(key)
        if route is None:
            return
        log.info("aborting", key=route.key, stage=route.stage.value)
        self._end(route, "abort", code)

    @staticmethod
    def _sampling_options(params: SamplingParams) -> p.SamplingOptions:
        return p.SamplingOptions(
            max_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
            seed=params.seed, stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos,
        )  # fmt: skip

    # -- peers ---------------------------------------------------------------------------------------
    def _live(self, role: str) -> list[Peer]:
        return [peer for peer in self.peers.values() if peer.role == role and not peer.load.draining]

    def _roles_needed(self, route: Route) -> tuple[str, ...]:
        """A prompt that conditional disaggregation always prefills on its decode peer needs no prefill peer."""
        limit = self.config.disagg.local_prefill_max_tokens
        return ("decode",) if limit and len(route.request.prompt_ids) <= limit else ROLES

    def _missing_roles(self, route: Route | None = None) -> list[str]:
        """The roles (that the route needs) with no live peer: none registered, or all draining."""
        return [role for role in (self._roles_needed(route) if route else ROLES) if not self._live(role)]

    def _gone_roles(self) -> list[str]:
        """The roles with no live peer that have had none registered for peer_return_grace_s (a draining
        one counts: it is still there, and its restart follows). Until then one may still come back."""
        grace, now = self.config.disagg.peer_return_grace_s, time.monotonic()
        return [role for role in self._missing_roles() if now - self.role_seen_at[role] >= grace]

    def _unavailable(self, route: Route, gone: list[str] | None = None) -> str | None:
        """Why the request cannot be served (a role it needs is gone), or None: it may wait, queued."""
        needed = self._roles_needed(route)
        gone = [role for role in (self._gone_roles() if gone is None else gone) if role in needed]
        if not gone:
            return None
        grace = self.config.disagg.peer_return_grace_s
        return f"no {' or '.join(gone)} peer is serving" + (f" (none registered for {grace:g} s)" if grace else "")

    def _send_peer(self, peer: Peer, message: m._Control) -> None:
        future = self.peer_socket.send_multipart([peer.identity, m.encode(message)], flags=zmq.NOBLOCK)
        future.add_done_callback(lambda f: self._peer_send_done(peer, f))

    def _peer_send_done(self, peer: Peer, future: asyncio.Future) -> None:
        exc = None if future.cancelled() else future.exception()
        if exc is not None and self.peers.get(peer.name) is peer:  # not a newer peer of that name
            self._drop_peer(peer, f"unreachable ({exc})")

    def _reply_unregistered(self, identity: bytes, message: m.Registered) -> None:
        future = self.peer_socket.send_multipart([identity, m.encode(message)], flags=zmq.NOBLOCK)
        future.add_done_callback(m.log_send_failure("reply to an unregistered peer"))

    async def _peer_loop(self) -> None:
        while True:
            identity, frame = await self._recv_peer()
            try:
                message = m.decode_peer(frame)
            except m.ControlError as exc:
                log.error("bad message from a peer", peer=identity, error=str(exc))
                if (version := m.foreign_version(frame, "register")) is not None:  # refused, not left retrying
                    error = (
                        f"control protocol version {version} is not supported (the router speaks {m.CONTROL_VERSION})"
                    )
                    self._reply_unregistered(identity, m.Registered(ok=False, error=error, fatal=True))
                continue
            try:
                self._on_peer_message(identity, message)
            except Exception:  # a bug handling one message must not stop the router
                log.exception("failed to handle a peer message", peer=identity, type=type(message).__name__)

    async def _recv_peer(self) -> tuple[bytes, bytes]:
        while True:
            frames = await self.peer_socket.recv_multipart()
            if len(frames) == 2:
                return frames[0], frames[1]
            log.error("peer message with a wrong frame count", frames=len(frames))

    def _on_peer_message(self, identity: bytes, message: m.PeerMessage) -> None:
        name = identity.decode(errors="replace")
        if isinstance(message, m.Register):
            self._register(identity, message)
            return
        peer = self.peers.get(name)
        if peer is None:
            self._reply_unregistered(identity, m.Registered(ok=False, error=f"peer {name!r} is not registered: "
                                                                                 "register again"))  # fmt: skip
            return
        peer.last_seen = time.monotonic()
        if isinstance(message, m.Heartbeat):
            peer.load = message.load
            peer.full_until = 0.0
            self._send_peer(peer, m.HeartbeatAck())
            return
        route = self.routes.get(message.key)
        if route is None:  # an attempt that already ended
            if isinstance(message, m.Reserved) and message.ok:
                self._send_peer(peer, m.Cancel(key=message.key))
            return
        if isinstance(message, m.Reserved):
            self._on_reserved(route, peer, message)
        elif isinstance(message, m.Transferring):
            if route.stage is Stage.PREFILLING and route.prefill == peer.name:
                self._advance(route, Stage.TRANSFERRING, route.deadline - time.monotonic())  # same deadline
        elif isinstance(message, m.PrefillDone):
            self._on_prefill_done(route, peer, message)
        elif isinstance(message, m.Output):
            self._on_output(route, peer, message)

    def _register(self, identity: bytes, message: m.Register) -> None:
        name = identity.decode(errors="replace")
        try:
            if message.name != name:
                raise PeerMismatch(f"{message.role} peer registers as {message.name!r} but its socket's "
                                   f"routing id is {name!r}: set ROUTING_ID to the peer name")  # fmt: skip
            check_compatible(self.layout, message.layout, peer=f"{message.role} peer {name}")
            if message.role == "decode":
                if problem := unconnectable(message.kv_endpoint or ""):
                    raise PeerMismatch(f"decode peer {name} kv_endpoint {message.kv_endpoint!r}: {problem}")
        except PeerMismatch as exc:
            log.error("peer refused", peer=name, error=str(exc))
            self._reply_unregistered(identity, m.Registered(ok=False, error=str(exc), fatal=True))
            return
        old = self.peers.get(name)
        if old is not None:
            same = (old.pid, old.boot, old.epoch, old.role) == (message.pid, message.boot, message.epoch, message.role)
            if same:  # our reply was late
                self._send_peer(old, m.Registered(ok=True))
                return
        peer = Peer(
            name, message.role, identity, message.kv_endpoint, message.load, message.pid, message.epoch, message.boot
        )
        self.peers[name] = peer
        self.departed.pop(name, None)
        log.info("peer registered", peer=name, role=message.role, pid=message.pid, kv_endpoint=message.kv_endpoint,
                 kv_blocks=message.load.kv_blocks_total)  # fmt: skip
        self._send_peer(peer, m.Registered(ok=True))  # first: a peer ignores requests before it
        if old is not None:  # once the new one is in place: the old one's requests may retry on it
            self._peer_gone(old, "registered again (restarted)")
        elif peer.role == "decode":  # the first registered: queued requests no decode peer can hold end now
            self._end_unholdable()
        self._update_peer_gauges()

    def _drop_peer(self, peer: Peer, why: str) -> None:
        if self.peers.get(peer.name) is not peer:  # already dropped, or replaced by a restarted one
            return
        del self.peers[peer.name]
        self._peer_gone(peer, why)

    def _peer_gone(self, peer: Peer, why: str) -> None:
        """A peer is no longer registered: its attempts fail (and are retried where they still can be)."""
        log.warning("peer dropped", peer=peer.name, role=peer.role, why=why, requests=len(peer.keys))
        if peer.role == "decode" and peer.kv_endpoint:
            for other in [p for p in self.peers.values() if p.role == "prefill"]:  # draining ones too
                self._send_peer(other, m.DropPeer(kv_endpoint=peer.kv_endpoint))
        for key in list(peer.keys):
            route = self.routes.get(key)
            if route is not None:
                self._attempt_failed(route, f"{peer.role} peer {peer.name} {why}", "peer_died", peer.name)
        if peer.role == "decode":
            if self.config.disagg.peer_return_grace_s and peer.name not in self.peers:  # not replaced by its restart
                self.departed[peer.name] = (time.monotonic(), peer.load)
            self._end_unholdable()
        self._update_peer_gauges()

    def _end_unholdable(self) -> None:
        """End the queued requests no decode peer could ever hold now: what a new one would be refused."""
        for route in list(self.queue):
            if problem := self._too_big(len(route.request.prompt_ids), route.request.params.max_tokens):
                self._end(route, "error", "unavailable", f"no decode peer left can take it: {problem}")

    # -- a request's stages --------------------------------------------------------------------------
    def _advance(self, route: Route, stage: Stage, deadline_s: float | None = None) -> None:
        now = time.monotonic()
        self.metrics.stage_seconds.labels(route.stage.value).observe(now - route.since)
        log.info(stage.value, key=route.key, after_ms=round((now - route.since) * 1e3, 2))
        route.stage, route.since = stage, now
        route.deadline = now + deadline_s if deadline_s is not None else float("inf")

    def _start_attempt(self, route: Route, *, counted: bool = True) -> None:
        """A new attempt (a new key); `counted=False`: a restart of the same one (max_attempts unchanged)."""
        route.attempt += 1 if counted else 0
        route.key = f"{route.request.key}#{route.attempt}@{self.boot}.{next(self.attempt_numbers)}"
        route.stage, route.since, route.deadline = Stage.WAITING_FOR_RESERVATION, time.monotonic(), float("inf")
        route.decode = route.prefill = None
        if counted:  # the queue wait counts per attempt
            route.queued_since = 0.0
        self.routes[route.key] = route
        self._queue_up(route)  # served by the caller, or within a tick (retries fail in batches: one pass after)

    def _queue_up(self, route: Route) -> None:
        """Queue a route in admission order (a retry, or a refused reservation, goes back ahead of the
        requests that arrived after it); its queue_timeout_s counts from its first time in this attempt."""
        route.queued = True
        route.queued_since = route.queued_since or time.monotonic()
        index = len(self.queue)
        while index and self.queue[index - 1].arrival > route.arrival:
            index -= 1
        self.queue.insert(index, route)

    def _serve_queue(self) -> None:
        """Reserve for queued requests, first come, first served: a request never takes room on a decode
        peer that an earlier queued request could use (else a stream of small requests would starve a
        big one), while a peer that no earlier one can use still serves it. Stops once no peer that is
        still open to later requests has room."""
        live = self._live("decode")
        if not live:  # requests wait for one to come back
            return
        prefill_live = bool(self._live("prefill"))
        now = time.monotonic()
        room = {peer.name: self._decode_room(peer) for peer in live if peer.full_until <= now}
        claimed: set[str] = set()  # peers whose room an earlier queued request waits for
        served = False
        for route in self.queue:
            if all(free <= 0 for name, free in room.items() if name not in claimed):
                break
            if not prefill_live and "prefill" in self._roles_needed(route):  # it waits for one to come back
                continue
            # Only peers that can ever take the request (a smaller one would refuse it, ending it).
            whole = self._whole_blocks(route)
            holders = [peer for peer in live if self._can_hold(peer.load, route.blocks, whole)]
            candidates = [(room[peer.name], peer) for peer in holders if peer.name in room and peer.name not in claimed]
            if self._try_reserve(route, candidates):
                route.queued, served = False, True
                room[route.decode] = self._decode_room(self.peers[route.decode])
            else:
                claimed.update(peer.name for peer in holders)
        if served:
            self.queue = deque(route for route in self.queue if route.queued)

    def _whole_blocks(self, route: Route) -> int:
        """KV blocks of the request at its longest: prompt + max_tokens."""
        return self._blocks_for(len(route.request.prompt_ids) + route.request.params.max_tokens)

    def _decode_room(self, peer: Peer) -> int:
        """Blocks this decode peer could still reserve, counting reservations sent since its heartbeat."""
        pending = sum(self.routes[k].blocks for k in peer.keys
                      if k in self.routes and self.routes[k].stage is Stage.WAITING_FOR_RESERVATION)  # fmt: skip
        return peer.load.kv_blocks_free - peer.load.kv_blocks_reserve - pending

    def _try_reserve(self, route: Route, candidates: list[tuple[int, Peer]]) -> bool:
        """Send a Reserve to the best of these (room, decode peer) with room for the prompt."""
        now = time.monotonic()
        candidates = [(room, peer) for room, peer in candidates if room >= route.blocks]
        if not candidates:
            return False
        fresh = [(room, peer) for room, peer in candidates if peer.name not in route.failed_peers]
        candidates = fresh or candidates
        trusted = [(room, peer) for room, peer in candidates if peer.avoid_until <= now]
        candidates = trusted or candidates
        _, peer = max(candidates, key=lambda c: (c[0], -len(c[1].keys)))
        route.decode = peer.name
        peer.keys.add(route.key)
        route.deadline = now + self.config.disagg.reserve_timeout_s
        route.local = self._prefill_locally(route)
        req = route.request
        self._send_peer(peer, m.Reserve(key=route.key, prompt_ids=req.prompt_ids, sampling=route.sampling,
                                        prefill_here=route.local))  # fmt: skip
        return True

    def _prefill_locally(self, route: Route) -> bool:
        """Conditional disaggregation: a short prompt, or a backed-up prefill pool, skips the transfer."""
        d = self.config.disagg
        if d.local_prefill_max_tokens and len(route.request.prompt_ids) <= d.local_prefill_max_tokens:
            return True
        prefills = self._live("prefill")
        return bool(d.local_prefill_queue and prefills and
                    all(len(p.keys) + p.load.waiting >= d.local_prefill_queue for p in prefills))  # fmt: skip

    def _on_reserved(self, route: Route, peer: Peer, message: m.Reserved) -> None:
        if route.stage is not Stage.WAITING_FOR_RESERVATION or route.decode != peer.name:
            return
        if not message.ok:
            peer.keys.discard(route.key)
            route.decode = None
            if message.code == "invalid_request":
                self._end(route, "error", "invalid_request", message.error)
                return
            peer.full_until = float("inf")  # until its next heartbeat shows the room it really has
            log.info("decode peer refused the reservation; queued", key=route.key, peer=peer.name, why=message.error)
            route.deadline = float("inf")
            self._queue_up(route)
            return
        if route.local:
            log.info("prefilling on the decode peer", key=route.key, peer=peer.name)
            self._advance(route, Stage.PREFILLING, self.config.disagg.prefill_timeout_s)
            return
        prefills = self._live("prefill")
        if not prefills:  # gone since the reservation was sent
            if self._unavailable(route) is None and not self.draining:  # it may come back: wait, no attempt lost
                self._cancel_on_peers(route)
                self._forget(route)
                self._start_attempt(route, counted=False)
            else:
                self._attempt_failed(route, "no prefill peer is registered", "no_prefill_peer")
            return
        prefills = [p for p in prefills if p.name not in route.failed_peers] or prefills
        prefill = min(prefills, key=lambda p: (len(p.keys) + p.load.waiting, p.name))
        route.prefill = prefill.name
        prefill.keys.add(route.key)
        self._advance(route, Stage.PREFILLING, self.config.disagg.prefill_timeout_s)
        req = route.request
        self._send_peer(prefill, m.Prefill(key=route.key, prompt_ids=req.prompt_ids, sampling=route.sampling,
                                           decode_peer=peer.name, kv_endpoint=peer.kv_endpoint or ""))  # fmt: skip

    def _on_prefill_done(self, route: Route, peer: Peer, message: m.PrefillDone) -> None:
        if route.prefill != peer.name:
            return
        peer.keys.discard(route.key)
        route.prefill = None
        if not message.ok and route.stage is Stage.DECODING:  # the decode peer had the KV: only late news
            log.warning("prefill peer reported a failure after decoding began", key=route.key, error=message.error)
            return
        if not message.ok and message.decode_side:  # the retry avoids the decode peer, not this one
            why = f"KV transfer from prefill peer {peer.name} to decode peer {route.decode}: {message.error}"
            decode = self.peers.get(route.decode) if route.decode else None
            if decode is not None:  # an unreachable kv_endpoint would fail every request sent to it
                decode.avoid_until = time.monotonic() + self.config.disagg.peer_timeout_s
                log.warning("decode peer avoided after a failed KV transfer", peer=decode.name,
                            seconds=self.config.disagg.peer_timeout_s)  # fmt: skip
            self._attempt_failed(route, why, "transfer_failed", route.decode)
            return
        if not message.ok:
            self._attempt_failed(route, f"prefill peer {peer.name}: {message.error}", "prefill_failed", peer.name)
            return
        if message.bytes and message.transfer_s > 0:
            log.info("KV transferred", key=route.key, bytes=message.bytes,
                     gb_per_s=round(message.bytes / message.transfer_s / 1e9, 3))  # fmt: skip
        if route.stage in (Stage.PREFILLING, Stage.TRANSFERRING):
            self._advance(route, Stage.WAITING_FOR_KV, self.config.disagg.prefill_timeout_s)

    def _on_output(self, route: Route, peer: Peer, message: m.Output) -> None:
        if route.decode != peer.name:
            return
        request = route.request
        if message.finished and message.reason == "error" and not message.token_ids and not request.token_ids:
            self._attempt_failed(route, f"decode peer {peer.name}: {message.error}", "decode_failed", peer.name)
            return
        if problem := self._bad_output(message):
            why = f"decode peer {peer.name} sent {problem}"
            log.error("bad output from a peer", key=route.key, peer=peer.name, error=problem)
            self._attempt_failed(route, why, "decode_failed", peer.name)
            return
        stall = self.config.disagg.decode_stall_timeout_s
        if route.stage is not Stage.DECODING:
            self._advance(route, Stage.DECODING, stall)
            # The decode peer has the whole KV: the request no longer depends on its prefill peer, whose
            # PrefillDone may still be on its way or lost with it (a dropped prefill peer must not end it).
            prefill = self.peers.get(route.prefill) if route.prefill else None
            if prefill is not None:
                prefill.keys.discard(route.key)
            route.prefill = None
        else:
            route.deadline = time.monotonic() + stall  # every output restarts the stall clock
        if message.finished:
            self._forget(route)
            self.metrics.stage_seconds.labels(Stage.DECODING.value).observe(time.monotonic() - route.since)
        self.deliver(request.key, message.token_ids, message.finished, message.reason, message.error)

    def _bad_output(self, message: m.Output) -> str | None:
        """What is wrong with a peer's Output (peers are checked like clients), or None."""
        vocab = self.model_config.vocab_size
        for token in message.token_ids:
            if not 0 <= token < vocab:
                return f"token id {token}, outside the vocabulary (0..{vocab - 1})"
        if message.finished and message.reason not in p.FINISH_REASONS:
            return f"finish reason {message.reason!r} (expected one of {', '.join(p.FINISH_REASONS)})"
        return None

    # -- endings -------------------------------------------------------------------------------------
    def _cancel_on_peers(self, route: Route) -> None:
        for name in (route.prefill, route.decode):
            peer = self.peers.get(name) if name else None
            if peer is not None:
                peer.keys.discard(route.key)
                self._send_peer(peer, m.Cancel(key=route.key))

    def _forget(self, route: Route) -> None:
        """The attempt is over on the router's side (its peers have finished or been told to cancel)."""
        self.routes.pop(route.key, None)
        for name in (route.prefill, route.decode):
            peer = self.peers.get(name) if name else None
            if peer is not None:
                peer.keys.discard(route.key)
        if route.queued:
            route.queued = False
            try:
                self.queue.remove(route)
            except ValueError:
                pass

    def _attempt_failed(self, route: Route, why: str, label: str, culprit: str | None = None) -> None:
        if culprit:
            route.failed_peers.add(culprit)
        self._cancel_on_peers(route)
        self._forget(route)
        request = route.request
        if request.key not in self.inflight:
            return
        if request.token_ids:
            self._end(route, "error", "peer_failed", f"{why} after {len(request.token_ids)} tokens were streamed")
        elif route.attempt >= self.config.disagg.max_attempts or self.draining:
            self._end(route, "error", "peer_failed", f"{why} (attempt {route.attempt} of "
                                                     f"{self.config.disagg.max_attempts})")  # fmt: skip
        elif problem := self._unavailable(route):
            self._end(route, "error", "peer_failed", f"{why}; nothing to retry on: {problem}")
        else:
            log.warning("attempt failed; retrying", key=route.key, why=why)
            self.metrics.retries.labels(label).inc()
            self._start_attempt(route)

    def _end(self, route: Route, reason: str, code: str | None, error: str | None = None) -> None:
        self._cancel_on_peers(route)
        self._forget(route)
        if route.request.key in self.inflight:
            self.finish(route.request, reason, error=error, error_code=code)

    def finish(self, request: ClientRequest, reason: str, error: str | None = None,
               error_code: str | None = None) -> None:  # fmt: skip
        self.by_client.pop(request.key, None)
        super().finish(request, reason, error=error, error_code=error_code)

    # -- the tick: dead peers, stage deadlines, the queue --------------------------------------------
    async def _tick_loop(self) -> None:
        while True:
            self._tick(time.monotonic())
            self._update_gauges()
            await asyncio.sleep(TICK_S)

    def _tick(self, now: float) -> None:
        d = self.config.disagg
        for role in ROLES:
            if any(peer.role == role for peer in self.peers.values()):  # draining too: the grace starts at its drop
                self.role_seen_at[role] = now
            if self._live(role):
                self.roles_missing.discard(role)
            elif role not in self.roles_missing:
                self.roles_missing.add(role)
                log.warning("no live peer of a role; requests wait for one", role=role,
                            grace_s=d.peer_return_grace_s)  # fmt: skip
        for peer in list(self.peers.values()):
            if now - peer.last_seen > d.peer_timeout_s:
                self._drop_peer(peer, f"missed heartbeats for {now - peer.last_seen:.1f} s")
        if expired := [name for name, (when, _) in self.departed.items() if now - when >= d.peer_return_grace_s]:
            for name in expired:  # not back in time
                del self.departed[name]
            self._end_unholdable()
        for route in list(self.routes.values()):
            if self.routes.get(route.key) is not route:  # ended by an earlier one in this loop
                continue
            if route.queued and now - route.queued_since > d.queue_timeout_s:
                self._end(route, "error", *self._queue_timeout(route))
            elif not route.queued and now > route.deadline:
                stuck = route.prefill if route.stage in (Stage.PREFILLING, Stage.TRANSFERRING) else None
                self._attempt_failed(route, f"{route.stage.value} timed out", f"{route.stage.value}_timeout",
                                     stuck or route.decode)  # fmt: skip
        if self.queue and (gone := self._gone_roles()):
            for route in list(self.queue):  # what a new request would be told now
                if problem := self._unavailable(route, gone):
                    self._end(route, "error", "unavailable", problem)
        self._serve_queue()

    def _queue_timeout(self, route: Route) -> tuple[str, str]:
        """(code, message) for a request that waited queue_timeout_s: overloaded if live peers could
        take it but had no room, unavailable if what it waited for was a peer to come back."""
        waited = f"waited queue_timeout_s = {self.config.disagg.queue_timeout_s:g} s"
        if missing := self._missing_roles(route):
            return "unavailable", f"{waited}: no {' or '.join(missing)} peer is serving"
        whole = self._whole_blocks(route)
        if not any(self._can_hold(peer.load, route.blocks, whole) for peer in self._live("decode")):
            return "unavailable", f"{waited}: no decode peer serving now can hold its {whole} KV blocks"
        return "overloaded", (f"{waited}: no decode peer had room for its {route.blocks} KV blocks "
                              "(requests wait for room in arrival order)")  # fmt: skip

    def _update_gauges(self) -> None:
        counts = dict.fromkeys(Stage, 0)
        for route in self.routes.values():
            counts[route.stage] += 1
        for stage, n in counts.items():
            self.metrics.request_states.labels(stage.value).set(n)

    def _update_peer_gauges(self) -> None:
        for role in ("prefill", "decode"):
            self.metrics.peers.labels(role).set(sum(peer.role == role for peer in self.peers.values()))

    def stats(self) -> dict[str, int | float | str]:
        stats: dict[str, int | float | str] = dict(super().stats())
        stats["prefill_peers"] = sum(peer.role == "prefill" for peer in self.peers.values())
        stats["decode_peers"] = sum(peer.role == "decode" for peer in self.peers.values())
        stats["queued"] = len(self.queue)
        for stage in Stage:
            stats[f"state.{stage.value}"] = sum(route.stage is stage for route in self.routes.values())
        for peer in self.peers.values():
            load = peer.load
            prefix = f"peer.{peer.name}"
            stats[f"{prefix}.role"] = peer.role
            stats[f"{prefix}.pid"] = peer.pid
            stats[f"{prefix}.kv_blocks_free"] = load.kv_blocks_free
            stats[f"{prefix}.kv_blocks_total"] = load.kv_blocks_total
            stats[f"{prefix}.requests"] = load.waiting + load.running
            stats[f"{prefix}.assigned"] = len(peer.keys)  # attempts the router has on it now
        return stats
