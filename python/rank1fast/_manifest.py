"""What an analysis reads from a dump's ``manifest.json`` besides the tensors (the dump format
itself is :class:`rank1fast.Dump`'s, in :mod:`rank1fast.collect`)."""

from __future__ import annotations

import json
from pathlib import Path

# The file name of a dump's manifest (collect, distributed and cluster analyses write it).
MANIFEST = "manifest.json"


def site_modules(path: Path) -> dict[str, str]:
    """site -> module path from a dump's manifest (empty for bare files)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return {}
    try:
        sites = json.loads(manifest.read_text()).get("sites", {})
        return {name: s["module"] for name, s in sites.items() if "module" in s}
    except (ValueError, AttributeError, TypeError):
        return {}
