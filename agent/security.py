"""Queue security: signed trial payloads and URLs that never show their passwords.

Workers execute the model code a payload carries, so anyone who can write to the broker could run code on
every GPU host. With a shared secret (`OPTAGENT_SECRET`) the coordinator signs each payload with
HMAC-SHA256 over its canonical JSON, and workers refuse payloads that are unsigned or altered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

SIGNATURE_KEY = "signature"
SCHEME = "hmac-sha256"
MASK = "***"
_SECRET_QUERY_KEYS = {"password", "passwd", "pass", "secret", "token", "sslpassword"}


def secret_from_env() -> str | None:
    """The shared signing secret, or None when payloads travel unsigned."""
    return os.environ.get("OPTAGENT_SECRET") or None


def canonical_json(payload: dict[str, Any]) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, the signature itself left out."""
    body = {k: v for k, v in payload.items() if k != SIGNATURE_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _digest(payload: dict[str, Any], secret: str) -> str:
    return hmac.new(secret.encode(), canonical_json(payload), hashlib.sha256).hexdigest()


def sign_payload(payload: dict[str, Any], secret: str) -> dict[str, Any]:
    """A copy of `payload` carrying `signature: "hmac-sha256:<hex>"`."""
    return {**payload, SIGNATURE_KEY: f"{SCHEME}:{_digest(payload, secret)}"}


def signature_problem(payload: dict[str, Any], secret: str) -> str | None:
    """Why `payload` must be refused under `secret`, or None when its signature is valid."""
    signature = payload.get(SIGNATURE_KEY)
    if not signature:
        return "unsigned payload (set OPTAGENT_SECRET on the coordinator as well as on the workers)"
    scheme, _, given = str(signature).partition(":")
    if scheme != SCHEME:
        return f"unsupported signature scheme {scheme!r} (expected {SCHEME})"
    try:
        expected = _digest(payload, secret)
    except (TypeError, ValueError) as exc:
        return f"payload is not canonical JSON ({exc})"
    if not hmac.compare_digest(expected, given):
        return "signature mismatch: the payload was altered or signed with a different OPTAGENT_SECRET"
    return None


def verify_payload(payload: dict[str, Any], secret: str) -> bool:
    """True when `payload` was signed with `secret` and not changed since (constant-time compare)."""
    return signature_problem(payload, secret) is None


def redact_url(url: str) -> str:
    """`url` with its password (userinfo or a password-like query parameter) replaced by ***.

    A URL that does not parse (a typo such as `postgresql+psycopg:/user:SECRET@host/db`) is masked by
    pattern instead: whatever stands between a `user:` and an `@` is taken for a password.
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return redact_text(url)
    netloc, query = parts.netloc, parts.query
    if password is not None:
        user = parts.username or ""
        host = netloc.rsplit("@", 1)[1]
        netloc = f"{user}:{MASK}@{host}"
    pairs = parse_qsl(query, keep_blank_values=True) if query else []
    if any(k.lower() in _SECRET_QUERY_KEYS for k, _ in pairs):
        query = urlencode([(k, MASK if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*/")
    if (netloc, query) == (parts.netloc, parts.query):
        return redact_text(url)  # nothing urlsplit could see (or a malformed URL): mask by pattern, keep the text
    return redact_text(urlunsplit(SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment)))


# user:password@ after a scheme, however many slashes (none, one, two): everything up to the last '@' before the
# host is masked, so a password holding ':' or '/' is masked whole
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*:/{0,3}[^\s:/@'\"]*:)(?P<secret>[^\s'\"]*)(?=@)")
_QUERY_SECRET = re.compile(r"(?P<head>[?&;](?:" + "|".join(sorted(_SECRET_QUERY_KEYS)) + r")=)(?P<secret>[^&\s'\"]+)",
                           re.IGNORECASE)
_PASSWORD_WORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<secret>[^\s'\"]+)", re.IGNORECASE)


def redact_text(text: str) -> str:
    """Every URL-like password in free text masked: `scheme:[//]user:PASSWORD@host`, `?password=...`, and
    libpq's `password=...` (drivers echo connection strings in their errors, well-formed or not)."""
    text = _USERINFO.sub(lambda m: m.group("head") + MASK, text)
    text = _QUERY_SECRET.sub(lambda m: m.group("head") + MASK, text)
    return _PASSWORD_WORD.sub(lambda m: m.group("head") + MASK, text)


LOOPBACK_HOSTS = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_loopback(url: str) -> bool:
    """Whether a broker URL points at this machine's loopback interface (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    try:
        host = (urlsplit(url.strip()).hostname or "").lower()
    except ValueError:
        return False
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_secret(broker_url: str, insecure: bool, who: str) -> None:
    """Secure by default: payloads carry code, so a broker other hosts can reach needs OPTAGENT_SECRET.

    Raises UserError (one line, with the fix) when `broker_url` is not on loopback, no secret is set and
    `insecure` was not asked for. `who` names the command for the message (`optagent worker`, ...).
    """
    from optagent.errors import UserError

    if insecure or secret_from_env() or is_loopback(broker_url):
        return
    raise UserError(f"{who}: the broker {redact_url(broker_url)} is reachable from other hosts and OPTAGENT_SECRET "
                    "is not set, so anyone who can write to it could run code on the workers; export the same "
                    "long random OPTAGENT_SECRET on the coordinator and every worker (or pass --insecure on a "
                    "trusted network)")


class RedactingFilter(logging.Filter):
    """Masks known secrets (broker password, OPTAGENT_SECRET) in every log record that passes it."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        words = sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(w) for w in words)) if words else None

    def redact(self, text: str) -> str:
        return self._pattern.sub(MASK, text) if self._pattern else text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._pattern is not None:
            message = record.getMessage()
            clean = self.redact(message)
            if clean != message:
                record.msg, record.args = clean, None
        return True


def secrets_in(url: str | None) -> list[str]:
    """The secret strings a URL carries (its password), for RedactingFilter."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
    except ValueError:
        return []
    found += [v for k, v in parse_qsl(parts.query) if k.lower() in _SECRET_QUERY_KEYS and v]
    return [f for f in found if f]
