"""Writing files so that a crash leaves the old file or the new one, never half of one.

Shared by :mod:`rank1fast.adapter` (adapter directories, written in a temporary directory and
renamed), :mod:`rank1fast.collect` and :mod:`rank1fast.distributed` (dump manifests),
:mod:`rank1fast.report` and :mod:`rank1fast.vectors` (``.npz`` reports, vector files).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import Rank1IOError


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


def write_atomic(path: Path, write: Callable[[Path], None], what: str) -> None:
    """Write ``path`` by ``write(tmp)`` on a temporary name beside it, then rename it over
    ``path``; on any failure the temporary file is removed.

    Raises:
        Rank1IOError: ``write`` or the rename failed (an OSError, or a library's own error such
            as safetensors' ``SafetensorError``), naming ``path`` and ``what`` was written.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, Rank1IOError):
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise Rank1IOError(f"{path}: cannot write the {what}: {why}") from e
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
