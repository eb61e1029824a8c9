"""rank1fast: steering vectors as rank-1 LoRA adapters, with a fast Rust analyzer.

The pipeline: :func:`collect` activations to a dump, :func:`analyze` the dump (Rust core),
write adapters from steering vectors, and verify them against hook-based steering
(:func:`steering`). :func:`convert` does it all in one call: vector in, verified adapter out.
"""

from __future__ import annotations

from . import (
    corrections,  # light: torch is imported when a fit runs
    distributed,  # light: ray is imported when a cluster is used; makes SiteStats picklable
    llamacpp,  # light: gguf is imported when a GGUF is read or written
    serving,  # light: json and the safetensors header only
    vectors,  # light: torch is imported inside contrastive() and .pt loading
)
from ._version import __version__
from .adapter import write_adapter, write_adapters
from .analysis import analyze
from .collect import Dump, collect  # light: torch is imported only when collect() runs
from .convert import convert  # light: torch is imported when convert() runs
from .errors import (
    AdapterError,
    CorpusError,
    DumpError,
    InsufficientMemoryError,
    InvalidArgumentError,
    PathNotFoundError,
    Rank1Error,
    Rank1IOError,
    RankDeficientWarning,
    ResidualSiteError,
    SiteError,
)
from .explain import (  # light: torch is imported by the token pass and vector_share()
    Explanation,
    explain,
    lora_to_vectors,
    vector_share,
)
from .merging import merge_adapter
from .report import Direction, OneHot, Outlier, Report, SiteReport, merge
from .steering import steering  # light: torch is imported when a block is entered
from .verify import Fidelity, verify  # light: torch/peft are imported when verify() runs


def __getattr__(name: str) -> object:
    # load_model lives in models.py, which imports torch: loaded on first use.
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(f"module 'rank1fast' has no attribute {name!r}")


__all__ = [
    "collect",
    "load_model",
    "Dump",
    "analyze",
    "merge",
    "Report",
    "SiteReport",
    "Direction",
    "OneHot",
    "Outlier",
    "Rank1Error",
    "DumpError",
    "CorpusError",
    "PathNotFoundError",
    "Rank1IOError",
    "InvalidArgumentError",
    "InsufficientMemoryError",
    "SiteError",
    "ResidualSiteError",
    "AdapterError",
    "RankDeficientWarning",
    "write_adapter",
    "merge_adapter",
    "write_adapters",
    "serving",
    "corrections",
    "verify",
    "steering",
    "convert",
    "vectors",
    "distributed",
    "llamacpp",
    "Fidelity",
    "explain",
    "lora_to_vectors",
    "vector_share",
    "Explanation",
    "__version__",
]
