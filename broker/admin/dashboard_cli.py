"""`agentcard-broker dashboard`: open the dashboard through a one-time link.

The running daemon mints the link (`POST /_broker/ui/link`, asked with the admin key from the
state dir, so only its owner gets one); it works once, within a minute, on
`http://localhost:PORT` (browsers refuse passkeys on IP-address origins). Owns: asking for it,
opening it or printing it, and what to say when that fails. Must never: print the admin key.
"""

from __future__ import annotations

import argparse
import sys
import webbrowser
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.config import Config


def main(args: argparse.Namespace, cfg: Config | None) -> int:
    if cfg is None:
        return 1
    from broker.admin.client import DaemonClient

    client = DaemonClient(cfg)
    status, doc = client.admin("POST", "/_broker/ui/link")
    url = doc.get("url") if status == 200 else None
    if not isinstance(url, str) or not url.startswith("http://localhost:"):
        print(_why(client, status, doc), file=sys.stderr)
        return 1
    if args.print_url:
        print(url)
        print("(it works once, within a minute)", file=sys.stderr)
        return 0
    if webbrowser.open(url):  # a program with arguments, never a shell
        print("opened the dashboard in your browser")
    else:
        print(f"no browser could be opened here; open this link (once, within a minute):\n\n  {url}\n")
    return 0


def _why(client: object, status: int, doc: dict[str, object]) -> str:
    from broker.admin.access import key_path
    from broker.admin.client import DaemonClient

    assert isinstance(client, DaemonClient)
    if status == 0:
        if client.status() is None:
            return (
                f"agentcard-broker is not running (nothing answers on {client.address}); "
                "start it: agentcard-broker run"
            )
        return (
            f"cannot read the running daemon's admin key ({key_path(client.config.state_path())}): run "
            "this as the user the daemon runs as, with the same config"
        )
    error = doc.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    return f"the daemon refused a dashboard link ({status}): {message or 'no reason given'}"
