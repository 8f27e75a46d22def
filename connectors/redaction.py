"""Masking secrets before data reaches an audit record, a log line, a card or an error message.

Two nets: keys that name a secret (`password`, `api_key`, `authorization`...) have their values
masked whatever they hold, and values that look like a credential (Slack, GitHub and Standard
Webhooks tokens, private keys, URLs with a password) are masked whatever their key.
"""

from __future__ import annotations

import functools
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "[redacted]"

_SECRET_KEY = re.compile(
    r"(pass(word|wd)?|secret|token|api[_-]?key|apikey|authori[sz]ation|private[_-]?key|"
    r"signature|cookie|credential|session[_-]?id|client[_-]?secret)",
    re.IGNORECASE,
)
_SECRET_VALUE = re.compile(
    r"(xox[abposr]-[A-Za-z0-9-]{6,}|xapp-[A-Za-z0-9-]{6,}|whsec_[A-Za-z0-9+/=]{8,}|"
    r"gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|"
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(-----END [A-Z ]*PRIVATE KEY-----|$)|"
    r"\bBearer\s+[A-Za-z0-9._~+/-]{8,}=*)"
)

_SECRET_QUERY = re.compile(
    r"([?&](?:[a-z_]*token|[a-z_]*key|secret|sig|signature|password|code)=)[^&#\s]+", re.IGNORECASE
)

# The lookbehind anchors the scheme at its start: without it the engine retries the pattern from
# every letter of a long word, which is quadratic on the 256 KiB bodies that reach this.
_URL_PASSWORD = re.compile(
    r"(?<![A-Za-z0-9+.-])(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s:@]*:[^/\s@]*@", re.IGNORECASE
)


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    # Cached: the same few dozen keys come with every event.
    return bool(_SECRET_KEY.search(key))


# Every pattern above needs one of these; most text (titles, names, amounts) has none, and
# one scan for them is far cheaper than running the three patterns.
_MAYBE_SECRET = re.compile(r"xox|xapp-|whsec_|gh[pousr]_|github_pat_|-----BEGIN|Bearer|://|[?&]")


# The same net for a whole JSON document at once, cheap first: plain substrings of the lowered
# text, a superset of what the patterns above need (every secret-looking key holds one of the
# words, every credential one of the prefixes); the two URL patterns, which a plain URL does not
# trigger, run only when their anchor character is there at all.
_DOCUMENT_MARKERS = (
    "xox", "xapp-", "whsec_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_",
    "-----begin", "bearer", "pass", "secret", "token", "key", "authori", "signature", "cookie",
    "credential", "session",
)  # fmt: skip
_DOCUMENT_USERINFO = re.compile(r"://[^/\s@]*@")
_DOCUMENT_QUERY = re.compile(r"[?&][A-Za-z_]*=")


def may_hold_secret(json_text: str) -> bool:
    """False when `redact` would leave the JSON document `json_text` encodes unchanged: no
    secret-looking key, value or URL anywhere in it. True means "walk it with `redact`"."""
    lowered = json_text.lower()
    if any(marker in lowered for marker in _DOCUMENT_MARKERS):
        return True
    if "@" in json_text and _DOCUMENT_USERINFO.search(json_text):
        return True
    return ("?" in json_text or "&" in json_text) and bool(_DOCUMENT_QUERY.search(json_text))


def redact_text(text: str) -> str:
    """Mask credential-looking substrings and the password part of URLs in free text."""
    if len(text) < 8 or not _MAYBE_SECRET.search(text):
        return text
    masked = _SECRET_VALUE.sub(MASK, text)
    masked = _SECRET_QUERY.sub(rf"\g<1>{MASK}", masked)
    return _URL_PASSWORD.sub(rf"\g<scheme>{MASK}@", masked)


def redact_url(url: str) -> str:
    """Keep scheme, host and path of a URL; drop credentials and query values (often tokens)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    if parts.username or parts.password:
        host = f"{MASK}@{host}"
    query = "&".join(f"{pair.split('=', 1)[0]}={MASK}" for pair in parts.query.split("&") if pair)
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


def redact(value: Any) -> Any:
    """A copy of `value` (JSON-like data) with secrets masked."""
    if isinstance(value, dict):
        return {
            # Only strings are masked by key: `tokens_used: 5` is a count, not a credential.
            key: (
                MASK
                if isinstance(key, str) and is_secret_key(key) and isinstance(item, str) and item
                else redact(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
