"""Process hardening applied once when the daemon starts.

Owns: umask 077, no core dumps (RLIMIT_CORE 0), and on Linux PR_SET_DUMPABLE 0 so processes of
the same user cannot ptrace the broker or read its memory through /proc/PID/mem. Must never:
fail the start when the OS lacks a feature; it reports what it could apply.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def apply() -> dict[str, bool]:
    """Harden this process. Returns what was applied, for the `broker.ready` log line."""
    os.umask(0o077)
    applied = {"umask_077": True, "no_core_dumps": False, "not_dumpable": False}
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        applied["no_core_dumps"] = True
    except (ValueError, OSError):
        pass
    # Every proxied stream holds two descriptors; 1024 would cap the broker near 500 streams.
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, 1 << 20), hard))
    except (ValueError, OSError):
        pass
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
                applied["not_dumpable"] = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0
        except (OSError, AttributeError):
            pass
    return applied
