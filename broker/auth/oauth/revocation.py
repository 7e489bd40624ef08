"""RFC 7009 token revocation, for `logout`.

Owns: the revocation request (built by authlib's rfc7009) with the client's id and, for a
confidential client, its secret; one retry with an empty `client_secret` for servers that want
the field present for public clients. Must never: raise on a failed revocation (logout deletes
the tokens here whatever the server says), or follow a redirect.
"""

from __future__ import annotations

import aiohttp
from authlib.common.urls import url_encode
from authlib.oauth2.rfc7009 import prepare_revoke_token_request

from broker.auth.oauth.registration import ClientRecord
from broker.auth.oauth.transport import HTTP_TIMEOUT


async def _revocation_request(
    session: aiohttp.ClientSession, url: str, token: str, hint: str, client_auth: list[tuple[str, str]]
) -> int:
    body, headers = prepare_revoke_token_request(token, hint, body=url_encode(client_auth))
    async with session.post(
        url, data=body, headers=headers, allow_redirects=False, timeout=HTTP_TIMEOUT
    ) as r:
        return r.status


async def revoke(session: aiohttp.ClientSession, client: ClientRecord, token: str, hint: str) -> bool:
    """RFC 7009 §2.1, `hint` being `access_token` or `refresh_token`. True when the server
    accepted it (§2.2: HTTP 200)."""
    url = client.revocation_endpoint
    if not url:
        return False
    client_auth = [("client_id", client.client_id)]
    if client.client_secret:
        client_auth.append(("client_secret", client.client_secret))
    try:
        status = await _revocation_request(session, url, token, hint, client_auth)
        if status in (400, 401) and not client.client_secret:
            # some servers (the MCP SDK's) want the field present, empty, for public clients
            client_auth.append(("client_secret", ""))
            status = await _revocation_request(session, url, token, hint, client_auth)
    except (aiohttp.ClientError, TimeoutError):
        return False
    return status == 200
