"""The broker's OAuth Client ID Metadata Document, at /_broker/oauth/client.json.

Owns: what the document says (registration.client_document: the per-user callback as the one
redirect URI, a public client) for the configured `public_url`. An authorization server that
supports such documents fetches it to learn who the client_id `public_url +
/_broker/oauth/client.json` is. Must never: hold a secret, or answer when no `public_url` is set
(the client_id would be no URL anyone can fetch).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from broker.errors import BrokerError
from broker.http.server import Request, Response

if TYPE_CHECKING:
    from broker.runtime import Runtime


def handle(request: Request, rt: Runtime) -> Response:
    from broker.auth.oauth.registration import client_document
    from broker.auth.per_user import CALLBACK_PATH

    if request.method not in ("GET", "HEAD"):
        raise BrokerError("method_not_allowed", "use GET or HEAD here")
    public = (rt.snapshot.config.public_url or "").rstrip("/")
    if not public:
        raise BrokerError("not_found", "no client metadata document: public_url is not set")
    doc = client_document(public, public + CALLBACK_PATH)
    return Response(
        body=json.dumps(doc, indent=2).encode(),
        content_type="application/json",
        headers={"Cache-Control": "public, max-age=300"},
    )
