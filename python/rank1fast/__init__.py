"""rank1fast: steering vectors as rank-1 LoRA adapters, with a fast Rust analyzer.

The pipeline: :func:`collect` activations to a dump, :func:`analyze` the dump (Rust core),
write adapters from steering vectors, and verify them against hook-based steering.
"""

from __future__ import annotations

from .analysis import analyze
from .errors import (
    AdapterError,
    DumpError,
    InvalidArgumentError,
    PathNotFoundError,
    Rank1Error,
    Rank1IOError,
    SiteError,
)
from .report import Direction, OneHot, Outlier, Report, SiteReport, merge

__version__ = "0.1.0"

__all__ = [
    "analyze",
    "merge",
    "Report",
    "SiteReport",
    "Direction",
    "OneHot",
    "Outlier",
    "Rank1Error",
    "DumpError",
    "PathNotFoundError",
    "Rank1IOError",
    "InvalidArgumentError",
    "SiteError",
    "AdapterError",
    "__version__",
]
