"""The Socket Mode side of the Slack stand-in: `apps.connections.open` tickets, the websocket
endpoint, envelopes and their acks, pings and pongs. `SlackStandIn` (standin.py) mixes it in.

`apps.connections.open` takes the app-level token (`app_token`, `xapp-...`) and no other: a bot
token is answered `not_allowed_token_type`, as Slack does (and the app-level token is refused the
same way by every other method). It answers a one-use `ws://.../link/?ticket=...` URL on the
stand-in's port. There the stand-in speaks the protocol slack_sdk's Socket Mode clients expect:
`{"type": "hello", ...}` on connect; envelopes `{"envelope_id", "type", "payload",
"accepts_response_payload"}` sent by `send_envelope`, which waits for the app's ack
`{"envelope_id", "payload"?}`; websocket-level pings answered with pongs (slack_sdk pings
`sdk-ping-pong:<time>` and counts a missing pong as a stale connection), and `ping()` to check the
app answers Slack's; `disconnect()` asks the app to reconnect (`{"type": "disconnect"}`), and
`stop()` closes every socket with 1001 (going away).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

logger = logging.getLogger(__name__)

# The envelope types Slack sends over Socket Mode.
ENVELOPE_TYPES = frozenset({"events_api", "interactive", "slash_commands"})


@dataclass(frozen=True)
class SocketAck:
    """An app's answer to one Socket Mode envelope."""

    envelope_id: str
    type: str
    ack: dict[str, Any]


class SocketModeSide:
    """Socket Mode for `SlackStandIn`: tickets handed out by apps.connections.open and not used
    yet, the open sockets (newest last), envelopes waiting for their ack, pings waiting for their
    pong. The host sets `app_id` and `_socket_url` (the `ws://.../link/` base while serving)."""

    app_id: str
    _socket_url: str | None

    def _init_socket_mode(self) -> None:
        self.socket_acks: list[SocketAck] = []
        self.socket_connections = 0  # sockets ever accepted
        self._tickets: set[str] = set()
        self._sockets: list[web.WebSocketResponse] = []
        self._socket_change = asyncio.Condition()
        self._awaiting_ack: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._awaiting_pong: dict[bytes, asyncio.Future[None]] = {}

    async def _close_sockets(self) -> None:
        """Close every connection (1001, going away) and fail whatever waits on one."""
        for socket in list(self._sockets):
            await socket.close(code=WSCloseCode.GOING_AWAY, message=b"stand-in stopping")
        waiters: list[asyncio.Future[Any]] = [
            *self._awaiting_ack.values(),
            *self._awaiting_pong.values(),
        ]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionError("the Slack stand-in stopped"))

    @property
    def open_sockets(self) -> int:
        return len(self._sockets)

    async def wait_for_socket(self, timeout: float = 5.0) -> web.WebSocketResponse:
        """The newest open Socket Mode connection, once there is one."""
        async with self._socket_change:
            try:
                await asyncio.wait_for(
                    self._socket_change.wait_for(lambda: bool(self._sockets)), timeout
                )
            except TimeoutError:
                raise TimeoutError("no Socket Mode connection to the stand-in") from None
            return self._sockets[-1]

    async def wait_for_no_socket(self, timeout: float = 5.0) -> None:
        """Return once every Socket Mode connection is closed."""
        async with self._socket_change:
            try:
                await asyncio.wait_for(
                    self._socket_change.wait_for(lambda: not self._sockets), timeout
                )
            except TimeoutError:
                raise TimeoutError(f"{len(self._sockets)} Socket Mode connection(s) open") from None

    async def send_envelope(
        self,
        type: str,
        payload: dict[str, Any],
        *,
        accepts_response_payload: bool | None = None,
        timeout: float = 5.0,
    ) -> dict[str, Any]:
        """Deliver `payload` as Slack does over Socket Mode and return the app's ack.

        `type` is `interactive`, `slash_commands` or `events_api`. `accepts_response_payload`
        defaults to true except for Events API envelopes, whose acks carry nothing. Raises
        TimeoutError if the app does not ack within `timeout` (Slack would retry or show the
        user an error).
        """
        if type not in ENVELOPE_TYPES:
            raise ValueError(f"unknown envelope type {type!r}; one of {sorted(ENVELOPE_TYPES)}")
        socket = await self.wait_for_socket(timeout)
        if accepts_response_payload is None:
            accepts_response_payload = type != "events_api"
        envelope_id = str(uuid.uuid4())
        envelope: dict[str, Any] = {
            "envelope_id": envelope_id,
            "type": type,
            "payload": payload,
            "accepts_response_payload": accepts_response_payload,
        }
        if type == "events_api":
            envelope.update(retry_attempt=0, retry_reason="")
        acked: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._awaiting_ack[envelope_id] = acked
        try:
            await socket.send_json(envelope)
            try:
                ack = await asyncio.wait_for(acked, timeout)
            except TimeoutError:
                raise TimeoutError(f"no ack for {type} envelope {envelope_id}") from None
        finally:
            self._awaiting_ack.pop(envelope_id, None)
        self.socket_acks.append(SocketAck(envelope_id, type, ack))
        return ack

    async def ping(self, timeout: float = 5.0) -> None:
        """Ping the newest connection as Slack does; return once the app answered with a pong."""
        socket = await self.wait_for_socket(timeout)
        data = f"standin-ping:{uuid.uuid4().hex}".encode()
        ponged: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._awaiting_pong[data] = ponged
        try:
            await socket.ping(data)
            try:
                await asyncio.wait_for(ponged, timeout)
            except TimeoutError:
                raise TimeoutError("no pong from the Socket Mode app") from None
        finally:
            self._awaiting_pong.pop(data, None)

    async def disconnect(self, reason: str = "refresh_requested") -> None:
        """Tell the newest connection to go away, as Slack does before recycling a socket; a
        slack_sdk client then opens a new connection (apps.connections.open again)."""
        socket = await self.wait_for_socket()
        await socket.send_json(
            {"type": "disconnect", "reason": reason, "debug_info": {"host": "signoff-standin"}}
        )

    def _apps_connections_open(self, params: dict[str, Any]) -> dict[str, Any]:
        assert self._socket_url is not None, "answered only while serving"
        ticket = uuid.uuid4().hex
        self._tickets.add(ticket)
        return {"ok": True, "url": f"{self._socket_url}?ticket={ticket}&app_id={self.app_id}"}

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        if ticket not in self._tickets:
            # Slack's URLs are one-use and short-lived: get a new one from apps.connections.open.
            return web.Response(status=401, text="invalid or used ticket")
        self._tickets.discard(ticket)
        # Pings and pongs are handled below, not by aiohttp, so `ping()` can see the pongs.
        socket = web.WebSocketResponse(autoping=False)
        await socket.prepare(request)
        self.socket_connections += 1
        await socket.send_json(
            {
                "type": "hello",
                "num_connections": len(self._sockets) + 1,
                "debug_info": {
                    "host": "signoff-standin",
                    "build_number": 1,
                    "approximate_connection_time": 18060,
                },
                "connection_info": {"app_id": self.app_id},
            }
        )
        async with self._socket_change:
            self._sockets.append(socket)
            self._socket_change.notify_all()
        try:
            async for message in socket:
                await self._on_socket_message(socket, message.type, message.data)
        finally:
            async with self._socket_change:
                self._sockets.remove(socket)
                self._socket_change.notify_all()
        return socket

    async def _on_socket_message(
        self, socket: web.WebSocketResponse, kind: WSMsgType, data: Any
    ) -> None:
        if kind == WSMsgType.PING:
            await socket.pong(data)
        elif kind == WSMsgType.PONG:
            ponged = self._awaiting_pong.get(bytes(data or b""))
            if ponged is not None and not ponged.done():
                ponged.set_result(None)
        elif kind == WSMsgType.TEXT:
            try:
                message = json.loads(data)
            except ValueError:
                logger.warning("slack stand-in: Socket Mode message is not JSON: %.200s", data)
                return
            envelope_id = message.get("envelope_id") if isinstance(message, dict) else None
            waiter = self._awaiting_ack.get(str(envelope_id))
            if waiter is None:
                logger.warning("slack stand-in: unexpected Socket Mode message: %.200s", data)
            elif not waiter.done():
                waiter.set_result(message)
