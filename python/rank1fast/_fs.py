"""Writing files so that a crash leaves the old file or the new one, never half of one.

Shared by :mod:`rank1fast.adapter` (adapter directories, written in a temporary directory and
renamed), :mod:`rank1fast.collect` and :mod:`rank1fast.distributed` (dump manifests).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` (indent 2, a final newline) and fsync it; no rename: the
    caller writes into a temporary directory and renames that."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(file: Path, data: dict[str, Any]) -> None:
    """Replace ``file`` by ``data`` as JSON (indent 1): written to ``file.tmp``, fsynced and
    renamed over ``file``; the temporary file is removed on any failure."""
    tmp = file.with_name(file.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """fsync a directory (so a rename in it survives a crash); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
