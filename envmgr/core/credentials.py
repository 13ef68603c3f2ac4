"""Credentials in mirror URLs: found, masked for people, stripped for what is recorded.

The one place that decides what counts as a secret in a URL-like text; config, the TOML reader and the
steps call it (a mistyped value, an echoed URL or a lock must never show one)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_USERINFO = re.compile(r"(?:[a-zA-Z][a-zA-Z0-9+.-]*://|^)([^\s/@'\"]+)@[^\s/@]")


def credentials_in(text: str) -> list[str]:
    """The credentials in a URL-like text: `user:password` (both forms), or a token given as the user alone."""
    found = []
    for match in _USERINFO.finditer(text):
        userinfo = match.group(1)
        user, _, password = userinfo.partition(":")
        if password:
            found += [userinfo, password]
        elif len(user) >= 12:
            found.append(user)     # `https://TOKEN@host/simple`: a long user name alone is an access token
    return found


def mask_credentials(text: str) -> str:
    for secret in sorted(set(credentials_in(text)), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def mask_url(url: str | None) -> str | None:
    """`https://user:secret@host/x` -> `https://user:***@host/x`."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None and not parts.username:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    user = parts.username or ""
    netloc = f"{user}:***@{netloc}" if parts.password is not None else f"***@{netloc}"   # a user alone: a token
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def strip_credentials(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
