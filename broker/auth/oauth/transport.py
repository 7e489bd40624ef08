"""How the broker talks to OAuth endpoints: one kind of HTTP session, one timeout, one error.

Owns: the aiohttp session every call to an authorization or token endpoint goes through (the
OAuth routes' and the `client_credentials` routes'), the timeout of such a call, `OAuthError`,
and reading an RFC 6749 §5.2 error code from an answer. Must never: keep a cookie or take proxy
or netrc settings from the environment; put a server's free text into an error (it could echo a
secret). Callers pass `allow_redirects=False` on every call: an authorization server's redirect
is never followed.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=20, connect=10)

_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")


class OAuthError(Exception):
    """A failed OAuth step. `error` is the RFC 6749 code when the server gave one."""

    def __init__(self, message: str, error: str = "") -> None:
        super().__init__(message)
        self.error = error


def endpoint_session() -> aiohttp.ClientSession:
    """A session for OAuth endpoints: no cookie jar, nothing from the environment (proxies,
    netrc), so nothing but what the broker puts in a request reaches the server."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)


def error_code(doc: Any) -> str:
    """An RFC 6749 error code from a response, or "": never free text, which could echo a secret."""
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, str) and _ERROR_CODE.match(error) else ""
