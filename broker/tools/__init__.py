"""The product's helpers, not its core: the local sandbox AgentCard (`sandbox`), the demo,
`connect` (writes an agent host's MCP config) and the stdio bridge (`stdio`).

Owns: the entry points the command line calls for the sandbox and the demo (they check the
`sandbox` extra before importing what needs it), and `ToolError`, the one refusal a helper
hands back for the command line to print. Must never: be imported by the forwarding path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

Say = Callable[[str], None]


class ToolError(Exception):
    """A helper could not do what was asked; the message says why (and what to do instead)."""


def _require_sandbox_extra() -> None:
    try:
        import mcp  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ToolError("this needs the sandbox extra: pip install 'agentcard-broker[sandbox]'") from None


def run_sandbox(port: int, say: Say) -> int:
    """`agentcard-broker sandbox`: serve the sandbox on 127.0.0.1:`port` until SIGINT/SIGTERM."""
    _require_sandbox_extra()
    from broker.tools import sandbox

    try:
        return asyncio.run(sandbox.serve_forever(port, say))
    except OSError as exc:
        raise ToolError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from None


def run_demo(say: Say, per_user: bool = False) -> int:
    """`agentcard-broker demo [--per-user]`: the broker end to end against the sandbox, offline
    (with `per_user`: a chat platform's per-user route, two end users each with their own grant)."""
    _require_sandbox_extra()
    from broker.tools import demo, demo_per_user

    try:
        return asyncio.run(demo_per_user.run(say) if per_user else demo.run(say))
    except Exception as exc:  # noqa: BLE001 - the demo reports any failure in one line
        raise ToolError(f"demo failed: {type(exc).__name__}: {exc}") from None
