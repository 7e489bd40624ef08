"""The one table of errors the broker answers with itself, and the one place they are built.

Owns: the mapping from error code to HTTP status, and rendering the body (plain JSON or a
JSON-RPC error object for MCP requests). Must never put a secret in a message: callers pass
text that names routes and commands, never credential values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.http.server import Response

ERROR_HEADER = "X-Broker-Error"
JSONRPC_BROKER_ERROR = -32001
JSONRPC_URL_ELICITATION = -32042  # URLElicitationRequiredError, MCP 2025-11-25: "open this link"

# code -> HTTP status (SPEC.md "What agents see", plus not_found for unknown /_broker/ paths
# and peer_not_allowed for a unix-socket peer of another uid).
STATUS_BY_CODE: dict[str, int] = {
    "bad_request": 400,
    "request_timeout": 408,
    "host_not_allowed": 403,
    "origin_not_allowed": 403,
    "peer_not_allowed": 403,
    "live_mode_blocked": 403,
    "policy_denied": 403,
    "no_route": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_too_large": 413,
    "rate_limited": 429,
    "internal_error": 500,
    "upstream_unreachable": 502,
    "upstream_error": 502,
    "no_credential": 503,
    "needs_login": 503,
    "credential_rejected": 503,
    "upstream_timeout": 504,
    "client_unauthorized": 403,
    "user_required": 400,
    "needs_connect": 403,
    "store_unavailable": 503,
    # approvals (SPEC "Approvals, the dashboard, and card data")
    "approval_denied": 403,
    "approval_timeout": 403,
    "approval_required": 403,  # per-user routes: the end user approves through a link (like needs_connect)
    "admin_required": 403,  # a /_broker/ endpoint that decides something, asked without the admin key
    "approval_conflict": 409,  # deciding an approval that is unknown, decided, expired, or needs a passkey
}


@dataclass(frozen=True, slots=True)
class BrokerError(Exception):
    """An error the broker answers with itself. `message` must be safe to show an agent."""

    code: str
    message: str
    route: str | None = None
    retry_after: int | None = None
    http_status: int | None = None  # overrides the table, e.g. 431 for oversized headers
    connect_url: str | None = None  # needs_connect: where the end user connects AgentCard

    def __post_init__(self) -> None:
        if self.code not in STATUS_BY_CODE:
            raise ValueError(f"unknown broker error code {self.code!r}")

    @property
    def status(self) -> int:
        return self.http_status or STATUS_BY_CODE[self.code]

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def error_body(err: BrokerError, jsonrpc_id: Any = None, jsonrpc: bool = False) -> bytes:
    """The response body for `err`: a JSON-RPC error object when the request was JSON-RPC."""
    if jsonrpc and err.connect_url is not None:
        # the MCP client raises URLElicitationRequiredError and offers the link; one that does
        # not know URL elicitation still shows the message, which carries the link too
        elicitation = {
            "mode": "url",
            "elicitationId": err.connect_url.rstrip("/").rsplit("/", 1)[-1],
            "url": err.connect_url,
            "message": err.message,
        }
        doc: dict[str, Any] = {
            "jsonrpc": "2.0",
            "id": jsonrpc_id,
            "error": {
                "code": JSONRPC_URL_ELICITATION,
                "message": err.message,
                "data": {"elicitations": [elicitation], "code": err.code, "route": err.route},
            },
        }
    elif jsonrpc:
        doc = {
            "jsonrpc": "2.0",
            "id": jsonrpc_id,
            "error": {
                "code": JSONRPC_BROKER_ERROR,
                "message": err.message,
                "data": {"code": err.code, "route": err.route},
            },
        }
    else:
        doc = {"error": {"code": err.code, "message": err.message, "route": err.route}}
        if err.connect_url is not None:
            doc["error"]["connect_url"] = err.connect_url
    return json.dumps(doc).encode()


def error_response(err: BrokerError, *, jsonrpc_id: Any = None, jsonrpc: bool = False) -> Response:
    """Build the response for `err` (status, X-Broker-Error, Retry-After, body)."""
    from broker.http.server import Response

    headers = {ERROR_HEADER: err.code, "Cache-Control": "no-store"}
    if err.retry_after is not None:
        headers["Retry-After"] = str(err.retry_after)
    return Response(
        status=err.status,
        body=error_body(err, jsonrpc_id, jsonrpc),
        content_type="application/json",
        headers=headers,
    )
