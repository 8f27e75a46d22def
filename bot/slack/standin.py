"""A local stand-in for the Slack Web API: the methods Signoff calls, answered the way Slack does.

The integration tests and `signoff demo` point slack_sdk's `AsyncWebClient(base_url=standin.url)`
(and the `SLACK_API_URL` setting) at it. It keeps just enough workspace state to give realistic
answers (channels, DMs, users, user groups, posted messages), records every call, and can be told
to fail on purpose.

How a call is answered, in Slack's order:
1. A method it does not serve: `unknown_method` (HTTP 200, like Slack, with `req_method`).
2. No token: `not_authed`; a token other than the configured one: `invalid_auth`. The token is
   read from `Authorization: Bearer ...` or a `token` query/form parameter (Slack ignores a
   `token` key in a JSON body, and so does this).
3. An unparseable JSON body: `invalid_json` / `json_not_object`.
4. An injected fault (`fail_next`, `fail_every`).
5. Required parameters, from the method spec (see `load_method_spec`). Slack answers a missing
   argument with `invalid_arguments` and `response_metadata.messages` of the form
   `[ERROR] missing required field: email`; a missing `channel` on the `chat.*` methods is answered
   `channel_not_found` because Slack resolves the channel first. The stand-in adds the
   `missing required field` message in both cases so a test can see which argument it was.
6. The method itself. `blocks` are checked with slack_sdk's Block Kit models (field limits) and a
   count limit, and refused with Slack's `invalid_blocks` + `errors` (messages) answer. A bad modal
   in `views.open` is refused with `invalid_arguments`, as Slack does for views (not
   `invalid_blocks`).

Deliberate leniencies, each a convenience that real Slack does not offer:
- `usergroups.users.list` also accepts a group's handle (real Slack wants the `S...` id and answers
  `no_such_subteam`; resolve handles through `usergroups.list`, which is served too).
- Any non-empty `trigger_id` opens a view (real trigger ids expire after 3 seconds).
- Block checks are only as strict as slack_sdk's models: they catch field limits and missing
  required fields, but pass some blocks Slack refuses (a `header` with mrkdwn text, an `actions`
  block whose elements are not elements).
- Channel membership is not modelled: a known user counts as a member of every channel.

Socket Mode (`apps.connections.open`, the websocket, envelopes) is in standin_socket.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from slack_sdk.errors import SlackObjectFormationError
from slack_sdk.models.blocks import Block
from slack_sdk.models.views import View

from bot.slack.standin_socket import SocketModeSide

logger = logging.getLogger(__name__)

DEFAULT_TOKEN = "xoxb-signoff-standin-token"  # noqa: S105 - a fixed token for a local fake
DEFAULT_APP_TOKEN = "xapp-1-A0SIGNOFF-1-signoff-standin"  # noqa: S105 - likewise

# Methods that take the app-level token instead of the bot token.
APP_TOKEN_METHODS = frozenset({"apps.connections.open"})

# Slack's documented limits: 50 blocks in a message, 100 in a modal; message text is cut off past
# 40,000 characters, and chat.postMessage refuses longer text with msg_too_long.
MESSAGE_MAX_BLOCKS = 50
MODAL_MAX_BLOCKS = 100
TEXT_MAX_CHARS = 40_000
# A conversations.open for a group DM takes at most 8 users besides the caller.
MPIM_MAX_USERS = 8

# The shared reference next to the repository (a checkout), else the copy shipped in the package.
_REPOSITORY = Path(__file__).resolve().parents[2]
SHARED_SPEC = (
    _REPOSITORY.parent / "shared" / "reference" / "slack" / "slack_methods_params_errors.json"
)
PACKAGED_SPEC = Path(__file__).with_name("slack_methods.json")

# Parameters that form-encoded bodies carry as a JSON document in a string (slack_sdk sends some
# methods as forms; Slack decodes these fields either way).
_JSON_FIELDS = ("blocks", "attachments", "view", "metadata")

# User attributes that live in the `profile` object of users.info, not at its top level.
_PROFILE_KEYS = frozenset(
    {"email", "display_name", "title", "phone", "first_name", "last_name", "status_text"}
)

_Answer = dict[str, Any]

# What slack_sdk's Block Kit models raise for a malformed dict: their own validation error, or a
# plain Python error from a constructor given missing or mistyped fields.
_MODEL_ERRORS = (SlackObjectFormationError, TypeError, ValueError, AttributeError, LookupError)


def load_method_spec(path: Path | None = None) -> tuple[dict[str, frozenset[str]], Path]:
    """Required parameters per method, and the file they were read from.

    The file is the `{"source", "methods": {name: {"required": [...]}}}` extract of Slack's
    OpenAPI spec: `path` if given, else `SHARED_SPEC` if present, else `PACKAGED_SPEC`.
    """
    chosen = path or (SHARED_SPEC if SHARED_SPEC.is_file() else PACKAGED_SPEC)
    document = json.loads(chosen.read_text(encoding="utf-8"))
    methods: dict[str, Any] = document["methods"]
    required = {name: frozenset(entry.get("required", ())) for name, entry in methods.items()}
    return required, chosen


@dataclass(frozen=True)
class RecordedCall:
    """One call as received (token left out), and the answer it got."""

    method: str
    params: dict[str, Any]
    at: datetime
    status: int = 200
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


@dataclass
class PostedMessage:
    """A message as it reads now: `chat.update` changes it in place and counts `edits`."""

    channel: str
    ts: str
    text: str | None
    blocks: list[dict[str, Any]]
    user: str
    thread_ts: str | None = None
    attachments: list[Any] = field(default_factory=list)
    edits: int = 0
    edited_ts: str | None = None


@dataclass(frozen=True)
class EphemeralMessage:
    channel: str
    user: str
    message_ts: str
    text: str | None
    blocks: list[dict[str, Any]]
    thread_ts: str | None = None


@dataclass(frozen=True)
class OpenedView:
    id: str
    trigger_id: str
    view: dict[str, Any]


@dataclass
class _Fault:
    method: str | None  # None: every method
    error: str
    status: int
    retry_after: int
    remaining: int | None = None  # calls left to fail (fail_next); None: no count (fail_every)
    every: int = 1
    deadline: float | None = None  # time.monotonic() after which the fault is gone
    seen: int = 0

    def matches(self, method: str) -> bool:
        return self.method is None or self.method == method


@dataclass
class HeldCall:
    """A call the stand-in keeps in flight (`SlackStandIn.hold_next`)."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.released.set()


def _error(code: str, *messages: str, **extra: Any) -> _Answer:
    answer: _Answer = {"ok": False, "error": code, **extra}
    if messages:
        answer["response_metadata"] = {"messages": [f"[ERROR] {m}" for m in messages]}
    return answer


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() in {"1", "true", "yes"}
    return bool(value)


def _missing(value: Any) -> bool:
    return value is None or value == "" or value == []


class SlackStandIn(SocketModeSide):
    """An aiohttp server answering `/api/<method>` like the Slack Web API.

    Configuration is plain attributes that a test may change at any time: `channels` the bot is a
    member of, `not_in_channel` channels that exist without the bot, `users` (`{user_id: {name,
    real_name, email, ...}}`), `usergroups` (`{group_id: [user_id, ...]}`) with
    `usergroup_handles` (`{handle: group_id}`).
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        channels: Iterable[str] = (),
        not_in_channel: Iterable[str] = (),
        users: Mapping[str, Mapping[str, Any]] | None = None,
        usergroups: Mapping[str, Sequence[str]] | None = None,
        usergroup_handles: Mapping[str, str] | None = None,
        team_id: str = "T0SIGNOFF",
        team: str = "Signoff Stand-in",
        team_domain: str = "signoff-standin",
        bot_user_id: str = "U0SIGNOFFBOT",
        bot_id: str = "B0SIGNOFF",
        bot_name: str = "signoff",
        app_id: str = "A0SIGNOFF",
        spec_path: Path | None = None,
        app_token: str = DEFAULT_APP_TOKEN,
    ) -> None:
        self.token = token
        self.app_token = app_token
        self.channels: set[str] = set(channels)
        self.not_in_channel: set[str] = set(not_in_channel)
        self.users: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (users or {}).items()}
        self.usergroups: dict[str, list[str]] = {k: list(v) for k, v in (usergroups or {}).items()}
        self.usergroup_handles: dict[str, str] = dict(usergroup_handles or {})
        self.team_id = team_id
        self.team = team
        self.team_domain = team_domain
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.bot_name = bot_name
        self.app_id = app_id
        self.required_params, self.spec_path = load_method_spec(spec_path)

        self.calls: list[RecordedCall] = []
        self.ephemerals: list[EphemeralMessage] = []
        self.views: list[OpenedView] = []
        self._messages: list[PostedMessage] = []
        self._conversations: dict[frozenset[str], str] = {}  # DM / group DM members -> id
        self._faults: list[_Fault] = []
        self._holds: dict[str, list[HeldCall]] = {}  # method -> next calls to keep in flight
        self._releases: list[HeldCall] = []  # every hold, for stop() to release
        self._last_ts_us = 0
        self._counter = 0
        self._arrivals = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._socket_url: str | None = None
        self._init_socket_mode()
        self._handlers: dict[str, Callable[[dict[str, Any]], _Answer]] = {
            "apps.connections.open": self._apps_connections_open,
            "auth.test": self._auth_test,
            "chat.postMessage": self._chat_post_message,
            "chat.update": self._chat_update,
            "chat.postEphemeral": self._chat_post_ephemeral,
            "views.open": self._views_open,
            "conversations.open": self._conversations_open,
            "usergroups.list": self._usergroups_list,
            "usergroups.users.list": self._usergroups_users_list,
            "users.info": self._users_info,
            "users.lookupByEmail": self._users_lookup_by_email,
        }

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL ending in `/api/`, for `AsyncWebClient(base_url=...)` and SLACK_API_URL."""
        if self._url is None:
            raise RuntimeError("the Slack stand-in is not started")
        return self._url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._handle)
        app.router.add_get("/link/", self._socket)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runner = runner
        bound_port = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self._url = f"http://{shown}:{bound_port}/api/"
        self._socket_url = f"ws://{shown}:{bound_port}/link/"

    async def stop(self) -> None:
        """Close every Socket Mode connection (1001, going away), then stop serving."""
        await self._close_sockets()
        self._release_holds()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._url = None
            self._socket_url = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- what happened ---------------------------------------------------------------------------

    def calls_to(self, method: str) -> list[RecordedCall]:
        return [call for call in self.calls if call.method == method]

    async def wait_for_calls(
        self, method: str, count: int = 1, timeout: float = 5.0
    ) -> list[RecordedCall]:
        """The calls to `method` once there are at least `count` of them."""
        async with self._arrivals:
            try:
                await asyncio.wait_for(
                    self._arrivals.wait_for(lambda: len(self.calls_to(method)) >= count), timeout
                )
            except TimeoutError:
                raise TimeoutError(
                    f"expected {count} calls to {method}, got {len(self.calls_to(method))}"
                ) from None
        return self.calls_to(method)

    def messages(self, channel: str, *, thread_ts: str | None = None) -> list[PostedMessage]:
        """Copies of the messages in `channel` as they read now, thread replies included.

        With `thread_ts`, only the replies in that thread.
        """
        return [
            copy.deepcopy(m)
            for m in self._messages
            if m.channel == channel and (thread_ts is None or m.thread_ts == thread_ts)
        ]

    def dm_channel(self, user: str) -> str | None:
        """The id of the bot's DM with `user`, once conversations.open (or a post to it) made it."""
        return self._conversations.get(frozenset({user}))

    # -- faults ----------------------------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        error: str = "ratelimited",
        status: int | None = None,
        retry_after: int = 1,
        times: int = 1,
    ) -> None:
        """Answer the next `times` calls to `method` with `error`.

        `ratelimited` is answered as Slack does (HTTP 429, `Retry-After: retry_after`); any other
        error with HTTP 200 and `ok: false`, unless `status` says otherwise.
        """
        self._faults.append(
            _Fault(method, error, self._fault_status(error, status), retry_after, remaining=times)
        )

    def fail_every(
        self,
        every: int = 2,
        *,
        method: str | None = None,
        for_seconds: float | None = None,
        error: str = "ratelimited",
        status: int | None = None,
        retry_after: int = 1,
    ) -> None:
        """Fail every `every`-th call (to `method`, or to any method) from now on.

        The first `every - 1` calls pass. It lasts `for_seconds`, or until `clear_faults()`.
        """
        if every < 1:
            raise ValueError("every must be at least 1")
        deadline = None if for_seconds is None else time.monotonic() + for_seconds
        self._faults.append(
            _Fault(
                method,
                error,
                self._fault_status(error, status),
                retry_after,
                every=every,
                deadline=deadline,
            )
        )

    def hold_next(self, method: str) -> HeldCall:
        """Keep the next call to `method` in flight, received but neither applied nor answered,
        until it is released: a slow path through the network, so that calls made after it can
        overtake it."""
        held = HeldCall()
        self._holds.setdefault(method, []).append(held)
        self._releases.append(held)
        return held

    def clear_faults(self) -> None:
        self._faults.clear()
        self._release_holds()

    def _release_holds(self) -> None:
        for held in self._releases:
            held.release()
        self._releases.clear()
        self._holds.clear()

    @staticmethod
    def _fault_status(error: str, status: int | None) -> int:
        if status is not None:
            return status
        return 429 if error == "ratelimited" else 200

    def _take_fault(self, method: str) -> _Fault | None:
        now = time.monotonic()
        self._faults = [
            f
            for f in self._faults
            if (f.deadline is None or f.deadline > now) and (f.remaining is None or f.remaining > 0)
        ]
        hit: _Fault | None = None
        for fault in self._faults:
            if not fault.matches(method):
                continue
            if fault.remaining is not None:
                if hit is None:
                    fault.remaining -= 1
                    hit = fault
                continue
            # Every periodic fault counts every call it matches, whether or not it fires.
            fault.seen += 1
            if hit is None and fault.seen % fault.every == 0:
                hit = fault
        return hit

    # -- HTTP ------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        at = datetime.now(UTC)
        method = request.match_info["method"]
        params, token, body_error = await self._read_params(request)
        if self._holds.get(method):
            held = self._holds[method].pop(0)
            held.arrived.set()
            await held.released.wait()
        answer, status, headers = self._answer(method, params, token, body_error)
        error = None if answer.get("ok") else str(answer.get("error"))
        self.calls.append(RecordedCall(method, params, at, status, error))
        logger.debug("slack stand-in: %s -> %s %s", method, status, error or "ok")
        async with self._arrivals:
            self._arrivals.notify_all()
        return web.json_response(answer, status=status, headers=headers)

    async def _read_params(
        self, request: web.Request
    ) -> tuple[dict[str, Any], str | None, str | None]:
        """Query and body parameters merged, the token, and a body problem if any."""
        params: dict[str, Any] = dict(request.query)
        body_error: str | None = None
        if request.content_type == "application/json":
            raw = await request.read()
            try:
                body = json.loads(raw) if raw.strip() else {}
            except ValueError:
                body, body_error = {}, "invalid_json"
            if not isinstance(body, dict):
                body, body_error = {}, "json_not_object"
            # slack_sdk leaves unset arguments as null in JSON bodies; Slack reads them as absent.
            params.update({k: v for k, v in body.items() if v is not None and k != "token"})
        elif request.content_type in {"application/x-www-form-urlencoded", "multipart/form-data"}:
            form = await request.post()
            params.update({k: form[k] for k in form if isinstance(form[k], str)})
        for name in _JSON_FIELDS:
            value = params.get(name)
            if isinstance(value, str):
                try:
                    params[name] = json.loads(value)
                except ValueError:
                    pass  # left as a string; the method refuses it as malformed
        header = request.headers.get("Authorization", "")
        token = params.pop("token", None)
        if header.startswith("Bearer "):
            token = header.removeprefix("Bearer ").strip()
        return params, token or None, body_error

    def _answer(
        self, method: str, params: dict[str, Any], token: str | None, body_error: str | None
    ) -> tuple[_Answer, int, dict[str, str]]:
        handler = self._handlers.get(method)
        if handler is None:
            return _error("unknown_method", req_method=method), 200, {}
        if token is None:
            return _error("not_authed"), 200, {}
        wanted, other = (
            (self.app_token, self.token)
            if method in APP_TOKEN_METHODS
            else (self.token, self.app_token)
        )
        if token == other:
            return _error("not_allowed_token_type"), 200, {}
        if token != wanted:
            return _error("invalid_auth"), 200, {}
        if body_error is not None:
            return _error(body_error), 200, {}
        fault = self._take_fault(method)
        if fault is not None:
            headers = {"Retry-After": str(fault.retry_after)} if fault.status == 429 else {}
            return _error(fault.error), fault.status, headers
        for name in sorted(self.required_params.get(method, frozenset()) - {"token"}):
            if _missing(params.get(name)):
                code = (
                    "channel_not_found"
                    if name == "channel" and method.startswith("chat.")
                    else "invalid_arguments"
                )
                return _error(code, f"missing required field: {name}"), 200, {}
        return handler(params), 200, {}

    # -- state helpers ---------------------------------------------------------------------------

    def _next_ts(self) -> str:
        """A Slack message timestamp: wall-clock seconds.microseconds, strictly increasing."""
        micros = max(time.time_ns() // 1000, self._last_ts_us + 1)
        self._last_ts_us = micros
        return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"

    def _next_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}0STANDIN{self._counter:04d}"

    def _open_conversation(self, members: frozenset[str]) -> tuple[str, bool]:
        """The DM (one user) or group DM id for `members`, and whether it was open already."""
        existing = self._conversations.get(members)
        if existing is not None:
            return existing, True
        opened = self._next_id("D" if len(members) == 1 else "G")
        self._conversations[members] = opened
        return opened, False

    def _postable_channel(self, channel: str, *, allow_user: bool) -> tuple[str, str | None]:
        """The conversation a message to `channel` lands in, or Slack's error for it."""
        if channel in self.not_in_channel:
            return channel, "not_in_channel"
        if channel in self.channels or channel in self._conversations.values():
            return channel, None
        # Slack posts a message addressed to a user id into the app's DM with that user.
        if allow_user and channel in self.users:
            return self._open_conversation(frozenset({channel}))[0], None
        return channel, "channel_not_found"

    def _find_message(self, channel: str, ts: str) -> PostedMessage | None:
        for message in self._messages:
            if message.channel == channel and message.ts == ts:
                return message
        return None

    def _message_json(self, message: PostedMessage) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "type": "message",
            "subtype": "bot_message",
            "text": message.text or "",
            "user": message.user,
            "bot_id": self.bot_id,
            "app_id": self.app_id,
            "team": self.team_id,
            "ts": message.ts,
        }
        if message.blocks:
            answer["blocks"] = message.blocks
        if message.attachments:
            answer["attachments"] = message.attachments
        if message.thread_ts is not None:
            answer["thread_ts"] = message.thread_ts
        if message.edited_ts is not None:
            answer["edited"] = {"user": message.user, "ts": message.edited_ts}
        return answer

    def _user_json(self, user_id: str) -> dict[str, Any]:
        spec = self.users[user_id]
        name = str(spec.get("name", user_id.lower()))
        real_name = str(spec.get("real_name", name))
        profile: dict[str, Any] = {
            "real_name": real_name,
            "real_name_normalized": real_name,
            "display_name": name,
            "display_name_normalized": name,
            "team": self.team_id,
        }
        user: dict[str, Any] = {
            "id": user_id,
            "team_id": self.team_id,
            "name": name,
            "deleted": False,
            "real_name": real_name,
            "tz": "Etc/UTC",
            "tz_label": "Coordinated Universal Time",
            "tz_offset": 0,
            "is_admin": False,
            "is_owner": False,
            "is_bot": False,
            "is_app_user": False,
            "updated": 1700000000,
        }
        for key, value in spec.items():
            if key == "profile" and isinstance(value, Mapping):
                profile.update(value)
            elif key in _PROFILE_KEYS:
                profile[key] = value
            else:
                user[key] = value
        user["profile"] = profile
        return user

    # -- validation ------------------------------------------------------------------------------

    @staticmethod
    def _block_errors(blocks: Any, pointer: str, limit: int) -> list[str]:
        """Slack-style messages for what is wrong with `blocks`, empty when they are valid."""
        if not isinstance(blocks, list):
            return [f"must be an array [json-pointer:{pointer}]"]
        if len(blocks) > limit:
            return [f"no more than {limit} items allowed [json-pointer:{pointer}]"]
        errors: list[str] = []
        for index, raw in enumerate(blocks):
            where = f"{pointer}/{index}"
            if not isinstance(raw, dict):
                errors.append(f"must be an object [json-pointer:{where}]")
                continue
            try:
                block = Block.parse(raw)
                if block is None:
                    errors.append(f"unsupported type: {raw.get('type')} [json-pointer:{where}]")
                    continue
                # to_dict() runs the field-limit validators of the block and everything inside it.
                block.to_dict()
            except _MODEL_ERRORS as exc:
                errors.append(f"{exc} [json-pointer:{where}]")
        return errors

    def _content_problem(self, params: dict[str, Any], *, updating: bool = False) -> _Answer | None:
        """Slack's refusal of a message's text/blocks, or None when they may be posted."""
        text = params.get("text")
        blocks = params.get("blocks")
        if _missing(text) and _missing(blocks) and _missing(params.get("attachments")):
            if not (updating and blocks == []):
                return _error("no_text")
        if text is not None and len(str(text)) > TEXT_MAX_CHARS:
            return _error("msg_too_long")
        if blocks is None:
            return None
        if isinstance(blocks, str):
            return _error("invalid_blocks_format")
        errors = self._block_errors(blocks, "/blocks", MESSAGE_MAX_BLOCKS)
        if errors:
            return _error("invalid_blocks", *errors, errors=errors)
        return None

    # -- methods ---------------------------------------------------------------------------------

    def _auth_test(self, params: dict[str, Any]) -> _Answer:
        return {
            "ok": True,
            "url": f"https://{self.team_domain}.slack.com/",
            "team": self.team,
            "user": self.bot_name,
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _chat_post_message(self, params: dict[str, Any]) -> _Answer:
        channel, problem = self._postable_channel(str(params["channel"]), allow_user=True)
        if problem is not None:
            return _error(problem)
        refusal = self._content_problem(params)
        if refusal is not None:
            return refusal
        text = params.get("text")
        message = PostedMessage(
            channel=channel,
            ts=self._next_ts(),
            text=None if text is None else str(text),
            blocks=list(params.get("blocks") or []),
            user=self.bot_user_id,
            thread_ts=str(params["thread_ts"]) if params.get("thread_ts") else None,
            attachments=list(params.get("attachments") or []),
        )
        self._messages.append(message)
        return {
            "ok": True,
            "channel": channel,
            "ts": message.ts,
            "message": self._message_json(message),
        }

    def _chat_update(self, params: dict[str, Any]) -> _Answer:
        channel, problem = self._postable_channel(str(params["channel"]), allow_user=False)
        if problem is not None:
            return _error(problem)
        message = self._find_message(channel, str(params["ts"]))
        if message is None:
            return _error("message_not_found")
        refusal = self._content_problem(params, updating=True)
        if refusal is not None:
            return refusal
        # Slack keeps whatever the update does not mention (an empty `blocks` removes them).
        if "text" in params:
            message.text = str(params["text"])
        if "blocks" in params:
            message.blocks = list(params["blocks"])
        if "attachments" in params:
            message.attachments = list(params["attachments"])
        message.edits += 1
        message.edited_ts = self._next_ts()
        return {
            "ok": True,
            "channel": channel,
            "ts": message.ts,
            "text": message.text or "",
            "message": self._message_json(message),
        }

    def _chat_post_ephemeral(self, params: dict[str, Any]) -> _Answer:
        channel, problem = self._postable_channel(str(params["channel"]), allow_user=False)
        if problem is not None:
            return _error(problem)
        user = str(params["user"])
        # Membership is not modelled: a user the workspace knows counts as in every channel.
        if user not in self.users:
            return _error("user_not_in_channel")
        refusal = self._content_problem(params)
        if refusal is not None:
            return refusal
        text = params.get("text")
        ephemeral = EphemeralMessage(
            channel=channel,
            user=user,
            message_ts=self._next_ts(),
            text=None if text is None else str(text),
            blocks=list(params.get("blocks") or []),
            thread_ts=str(params["thread_ts"]) if params.get("thread_ts") else None,
        )
        self.ephemerals.append(ephemeral)
        return {"ok": True, "message_ts": ephemeral.message_ts}

    def _views_open(self, params: dict[str, Any]) -> _Answer:
        view = params["view"]
        if not isinstance(view, dict):
            return _error("invalid_arguments", "must be an object [json-pointer:/view]")
        if view.get("type") != "modal":
            return _error("invalid_arguments", "must be 'modal' [json-pointer:/view/type]")
        errors = self._block_errors(view.get("blocks", []), "/view/blocks", MODAL_MAX_BLOCKS)
        if not errors:
            try:
                View(**view).to_dict()
            except _MODEL_ERRORS as exc:
                errors.append(f"{exc} [json-pointer:/view]")
        if errors:
            return _error("invalid_arguments", *errors)
        view_id = self._next_id("V")
        opened = {
            "id": view_id,
            "team_id": self.team_id,
            "type": "modal",
            "title": view.get("title"),
            "submit": view.get("submit"),
            "close": view.get("close"),
            "blocks": view.get("blocks", []),
            "private_metadata": view.get("private_metadata", ""),
            "callback_id": view.get("callback_id", ""),
            "external_id": view.get("external_id", ""),
            "state": {"values": {}},
            "hash": f"{int(time.time())}.{view_id.lower()}",
            "clear_on_close": bool(view.get("clear_on_close", False)),
            "notify_on_close": bool(view.get("notify_on_close", False)),
            "root_view_id": view_id,
            "previous_view_id": None,
            "app_id": self.app_id,
            "bot_id": self.bot_id,
        }
        self.views.append(OpenedView(view_id, str(params["trigger_id"]), opened))
        return {"ok": True, "view": opened}

    def _conversations_open(self, params: dict[str, Any]) -> _Answer:
        channel = params.get("channel")
        if not _missing(channel):
            if channel in self._conversations.values() or channel in self.channels:
                return {"ok": True, "no_op": True, "already_open": True, "channel": {"id": channel}}
            return _error("channel_not_found")
        raw = params.get("users")
        if isinstance(raw, str):
            users = [u.strip() for u in raw.split(",") if u.strip()]
        elif isinstance(raw, list):
            users = [str(u) for u in raw]
        else:
            users = []
        if not users:
            return _error("users_list_not_supplied")
        if len(users) > MPIM_MAX_USERS:
            return _error("too_many_users")
        for user in users:
            if user not in self.users:
                return _error("user_not_found")
        conversation, already = self._open_conversation(frozenset(users))
        body: dict[str, Any] = {"id": conversation}
        if _truthy(params.get("return_im")):
            body.update(
                {
                    "created": 1700000000,
                    "is_im": len(users) == 1,
                    "is_mpim": len(users) > 1,
                    "is_org_shared": False,
                    "user": users[0],
                    "last_read": "0000000000.000000",
                    "latest": None,
                    "unread_count": 0,
                    "unread_count_display": 0,
                    "is_open": True,
                    "priority": 0,
                }
            )
        answer: _Answer = {"ok": True, "channel": body}
        if already:
            answer.update({"no_op": True, "already_open": True})
        return answer

    def _usergroups_list(self, params: dict[str, Any]) -> _Answer:
        handles = {group: handle for handle, group in self.usergroup_handles.items()}
        groups: list[dict[str, Any]] = []
        for group_id, members in self.usergroups.items():
            handle = handles.get(group_id, group_id.lower())
            entry: dict[str, Any] = {
                "id": group_id,
                "team_id": self.team_id,
                "is_usergroup": True,
                "is_subteam": True,
                "name": handle,
                "description": "",
                "handle": handle,
                "is_external": False,
                "date_create": 1700000000,
                "date_update": 1700000000,
                "date_delete": 0,
                "auto_provision": False,
                "created_by": self.bot_user_id,
                "updated_by": self.bot_user_id,
                "prefs": {"channels": [], "groups": []},
                "user_count": len(members),
            }
            if _truthy(params.get("include_users")):
                entry["users"] = list(members)
            groups.append(entry)
        return {"ok": True, "usergroups": groups}

    def _usergroups_users_list(self, params: dict[str, Any]) -> _Answer:
        wanted = str(params["usergroup"])
        group_id = wanted if wanted in self.usergroups else self.usergroup_handles.get(wanted)
        if group_id is None or group_id not in self.usergroups:
            return _error("no_such_subteam")
        return {"ok": True, "users": list(self.usergroups[group_id])}

    def _users_info(self, params: dict[str, Any]) -> _Answer:
        user = params.get("user")
        if not isinstance(user, str) or user not in self.users:
            return _error("user_not_found")
        return {"ok": True, "user": self._user_json(user)}

    def _users_lookup_by_email(self, params: dict[str, Any]) -> _Answer:
        email = str(params["email"]).strip().lower()
        for user_id, spec in self.users.items():
            known = spec.get("email") or spec.get("profile", {}).get("email")
            if isinstance(known, str) and known.lower() == email:
                return {"ok": True, "user": self._user_json(user_id)}
        return _error("users_not_found")
