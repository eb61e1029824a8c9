"""The exceptions rank1fast raises. Every one derives from :class:`Rank1Error`."""

from __future__ import annotations

__all__ = [
    "Rank1Error",
    "DumpError",
    "CorpusError",
    "PathNotFoundError",
    "Rank1IOError",
    "InvalidArgumentError",
    "InsufficientMemoryError",
    "SiteError",
    "AdapterError",
    "ResidualSiteError",
    "RankDeficientWarning",
]


class Rank1Error(Exception):
    """Base class of every rank1fast error."""


class DumpError(Rank1Error, ValueError):
    """A dump, .safetensors or .npy file is malformed, truncated or unsupported.

    The message names the file and, where there is one, the tensor.
    """


class CorpusError(DumpError):
    """A corpus file (``.jsonl`` of ``"text"`` or chat ``"messages"``) is malformed.

    The message names the file and the line. A :class:`DumpError` for code written before it
    had a class of its own.
    """


class PathNotFoundError(Rank1Error, FileNotFoundError):
    """A path given to rank1fast does not exist."""


class Rank1IOError(Rank1Error, OSError):
    """The operating system refused a read or a write (permissions, full disk)."""


class InvalidArgumentError(Rank1Error, ValueError):
    """An argument that cannot work: an unknown site, folds=0, a vector of the wrong size."""


class InsufficientMemoryError(Rank1Error, MemoryError):
    """The work would need more memory than is available (or than ``memory_limit`` allows).

    Raised before anything large is allocated; the message says how much is needed and which
    option makes it fit (fewer folds, no second moments, fewer threads).
    """


class SiteError(InvalidArgumentError):
    """A site name that does not resolve to a module of the model."""


class AdapterError(Rank1Error, ValueError):
    """An adapter cannot be written or read as asked."""


class ResidualSiteError(SiteError, AdapterError):
    """No linear module carries a residual-stream site (``resid_mid.L``/``resid_post.L``)
    faithfully on this model, so no LoRA adapter is written for it: a norm sits between the
    module and the residual add (post-norm blocks: Gemma 2/3, OLMo-2), or the MLP is a mixture
    of experts. The message names the norm or the experts and the alternatives; hook steering
    (:func:`rank1fast.steering`) still steers the site exactly."""

    @classmethod
    def refusing(cls, site: str, reason: str | None) -> ResidualSiteError:
        """The refusal of an adapter for ``site``, given the carrier's ``reason``."""
        return cls(
            f"{reason or f'site {site}: its module does not join the residual'}. No adapter is "
            "written for it: rank1fast writes residual-stream sites only where a linear "
            "module's output joins the residual stream unchanged"
        )


class RankDeficientWarning(UserWarning):
    """A site's second moments are singular (constant or duplicated dimensions, or fewer tokens
    than dimensions). The ridge still defines a direction; check its held-out error."""
