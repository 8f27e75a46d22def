"""Slack mrkdwn: escaping untrusted text, the few `<...>` constructs we emit, and reading them back.

Slack parses `<...>` in mrkdwn as links, mentions (`<@U1>`, `<!channel>`, `<!subteam^S1>`) and
dates, and asks senders to escape exactly `&`, `<` and `>` as HTML entities
(https://docs.slack.dev/messaging/formatting-message-text#escaping). Once escaped, text from an
event can neither ping anyone nor forge a link: every `<` left in our output is one we wrote.

So the rule is: escape every piece of event-controlled text with `escape_mrkdwn`, then assemble it
with the constructors here (`link`, `user`, `group`, `date`), whose own arguments are either
policy-controlled ids or neutralised by them. `cut_mrkdwn` shortens escaped text without splitting
an entity; `join_within` shortens assembled text without splitting a construct.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

ELLIPSIS = "…"

_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})

# Characters that would end a `<url|title>` construct early, or that Slack would not keep in a URL.
_URL_UNSAFE = {
    **{ord(c): f"%{ord(c):02X}" for c in "|<> \"'`"},
    **{n: f"%{n:02X}" for n in range(0x20)},
    0x7F: "%7F",
}
# Longer URLs are shown as their title only: no real link is this long, and Slack's own limit for
# a button's URL is 3000.
_MAX_URL = 2000
_MAX_LINK_TITLE = 200

# Slack ids (U0CFO, W012A3CDE, S0614TZR7): a type letter, then capitals and digits with at least
# one digit, which keeps an all-caps handle such as `SRE` from being read as a user group id.
_USER_ID = re.compile(r"^[UW][A-Z0-9]*[0-9][A-Z0-9]*$")
_GROUP_ID = re.compile(r"^S[A-Z0-9]*[0-9][A-Z0-9]*$")

_CONSTRUCT = re.compile(r"<([^<>]*)>")


def escape_mrkdwn(text: str) -> str:
    """`&`, `<`, `>` as entities: the text renders as written and cannot ping or link."""
    return text.translate(_ESCAPES)


def unescape_mrkdwn(text: str) -> str:
    # `&amp;` last, so that an escaped `&lt;` (`&amp;lt;`) comes back as the text `&lt;`.
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def cut(text: str, limit: int) -> str:
    """At most `limit` characters; a shortened text ends with an ellipsis."""
    if len(text) <= limit:
        return text
    return text[: limit - 1] + ELLIPSIS


def cut_mrkdwn(text: str, limit: int) -> str:
    """`cut` for escaped text: never leaves half an entity (`&am…`) behind."""
    if len(text) <= limit:
        return text
    return _entity_safe(text[: limit - 1]) + ELLIPSIS


def _entity_safe(head: str) -> str:
    # The longest entity we write is `&amp;` (5 characters): a cut one starts in the last 4.
    amp = head.rfind("&", max(0, len(head) - 4))
    if amp != -1 and ";" not in head[amp:]:
        return head[:amp]
    return head


def chunks_mrkdwn(text: str, size: int) -> list[str]:
    """Escaped text in pieces of at most `size` characters, no entity split between two pieces."""
    pieces: list[str] = []
    rest = text
    while len(rest) > size:
        head = _entity_safe(rest[:size])
        # Prefer to break after a newline when there is one in the second half of the piece.
        newline = head.rfind("\n", size // 2)
        if newline != -1:
            head = head[: newline + 1]
        pieces.append(head)
        rest = rest[len(head) :]
    if rest or not pieces:
        pieces.append(rest)
    return pieces


def join_within(
    items: Sequence[str],
    *,
    sep: str,
    limit: int,
    more: Callable[[int], str],
    head: str = "",
) -> str:
    """`head` then whole items joined by `sep`, as many as fit in `limit` with the `more(n)` note.

    Items are never cut in the middle (a half `<url|title>` would be a broken construct); an item
    longer than the whole budget is shortened with `cut_mrkdwn`, which is safe for escaped text.
    """
    out = head
    for index, item in enumerate(items):
        piece = item if index == 0 else sep + item
        left = len(items) - index - 1
        note = sep + more(left) if left else ""
        if len(out) + len(piece) + len(note) <= limit:
            out += piece
            continue
        if index == 0:
            # Not even the first item fits with the note: show what can be shown of it.
            return cut_mrkdwn(out + item, limit)
        # Fits: the previous round checked `out` plus a note for exactly these items.
        return out + sep + more(len(items) - index)
    return out


def link(url: str, title: str) -> str:
    """`<url|title>` with the title escaped and the URL neutralised; just the title when the URL
    is not a plain http(s) URL (a `javascript:` or `slack://` link is not followed from a card)."""
    label = escape_mrkdwn(cut(title or url, _MAX_LINK_TITLE))
    if not url.lower().startswith(("https://", "http://")) or len(url) > _MAX_URL:
        return label
    # Percent-encoding `|` and `>` keeps the URL from ending the construct or starting the label;
    # `&` becomes `&amp;`, which Slack decodes back in link targets.
    target = escape_mrkdwn(url.translate(_URL_UNSAFE))
    return f"<{target}|{label}>"


def is_user_id(ref: str) -> bool:
    return bool(_USER_ID.match(ref))


def is_group_id(ref: str) -> bool:
    return bool(_GROUP_ID.match(ref))


def user(ref: str) -> str:
    """A user mention for a Slack user id; any other name is shown as `@name`, inert."""
    if is_user_id(ref):
        return f"<@{ref}>"
    return "@" + escape_mrkdwn(ref.removeprefix("@"))


def group(ref: str) -> str:
    """A user-group mention for a Slack group id (`S...`); a handle is shown as `@handle`."""
    if is_group_id(ref):
        return f"<!subteam^{ref}>"
    return "@" + escape_mrkdwn(ref.removeprefix("@"))


def date(moment: datetime) -> str:
    """A time each reader sees in their own time zone; the fallback text is in UTC."""
    if moment.tzinfo is None:
        # Stored times are UTC (storage.types.UTCDateTime); a naive one can only be UTC.
        moment = moment.replace(tzinfo=UTC)
    fallback = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"<!date^{int(moment.timestamp())}^{{date_short_pretty}} {{time}}|{fallback}>"


def to_plain(text: str) -> str:
    """mrkdwn as terminal text: links as `title (url)`, mentions as `@id`, dates as their
    fallback, entities decoded. Only for display: the result is no longer safe to send to Slack."""
    out: list[str] = []
    position = 0
    for match in _CONSTRUCT.finditer(text):
        out.append(unescape_mrkdwn(text[position : match.start()]))
        out.append(_plain_construct(match.group(1)))
        position = match.end()
    out.append(unescape_mrkdwn(text[position:]))
    return "".join(out)


def _plain_construct(inner: str) -> str:
    target, _, label = inner.partition("|")
    if target.startswith("@"):
        return label or target
    if target.startswith("!subteam^"):
        return label or "@" + target.removeprefix("!subteam^")
    if target.startswith("!date^"):
        return unescape_mrkdwn(label)
    if target.startswith(("!", "#")):
        return "@" + (label or target[1:])
    url = unescape_mrkdwn(target)
    return f"{unescape_mrkdwn(label)} ({url})" if label else url
