"""Files the broker writes for itself (secrets in the file store, the budget ledger).

Owns: replacing a JSON file atomically: a whole document to a 0600 temp file beside it,
fsynced, renamed over the old one, the rename fsynced too. Must never: leave half a file,
or a file another user can read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def replace_json(path: Path, doc: Any) -> None:
    """Write `doc` to `path` so that a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # the rename itself on disk too
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the file itself is on disk
    finally:
        os.close(dir_fd)
