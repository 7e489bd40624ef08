"""RFC 7009 token revocation, for `logout`.

Owns: the revocation request with the client's id and, for a
confidential client, its secret; one retry with an empty `client_secret` for servers that want
the field present for public clients. Must never: raise on a failed revocation (logout deletes
the tokens here whatever the server says), or follow a redirect.
"""

from __future__ import annotations

import aiohttp

from broker.auth.oauth.registration import ClientRecord
from broker.auth.oauth.transport import HTTP_TIMEOUT


async def revoke(session: aiohttp.ClientSession, client: ClientRecord, token: str, hint: str) -> bool:
    """RFC 7009. True when the server accepted it."""
    if not client.revocation_endpoint:
        return False
    data = {"token": token, "token_type_hint": hint, "client_id": client.client_id}
    if client.client_secret:
        data["client_secret"] = client.client_secret
    try:
        async with session.post(
            client.revocation_endpoint, data=data, allow_redirects=False, timeout=HTTP_TIMEOUT
        ) as r:
            if r.status == 200:
                return True
            retry = r.status in (400, 401) and "client_secret" not in data
        if retry:  # some servers (the MCP SDK's) want the field present, empty, for public clients
            async with session.post(
                client.revocation_endpoint,
                data={**data, "client_secret": ""},
                allow_redirects=False,
                timeout=HTTP_TIMEOUT,
            ) as r:
                return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
    return False
