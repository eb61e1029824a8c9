"""``rank1fast.steering``: hook-based activation steering, the reference every adapter matches.

Inside ``with rank1fast.steering(model, {site: v}, scale=s):`` every forward pass of ``model``
moves each site by ``s·v``: ``resid_mid.L`` and ``resid_post.L`` are the residual stream (after
layer L's attention, after block L), whatever module carries it on the model's family
(:func:`rank1fast.models.site_carrier`): the output projection on pre-norm blocks (Llama & co.;
Granite's ``residual_multiplier`` divided out), the norm after the sublayer on post-norm blocks
(Gemma 2/3, OLMo-2: ``post_attention_layernorm``, ``post_feedforward_layernorm``), the sparse
block on MoE layers. A raw module path steers that module's output, whatever follows it (on a
post-norm block, ``model.layers.L.mlp.down_proj`` is steered before the norm rescales it). This
is how repeng's ``ControlModel``, llama.cpp's control vectors and Gemma Scope's
``hook_resid_post`` steer, and it is what :func:`rank1fast.verify`,
:func:`rank1fast.verify.calibrate_scale` and :func:`rank1fast.convert` compare adapters against.

The hooks are plain ``register_forward_hook`` hooks, removed on exit (also on an exception);
they work on a PEFT-wrapped model too (the LoRA layer's output is steered). Several
``steering`` blocks nest: their vectors add up.

torch is imported when a block is entered; ``import rank1fast`` does not import it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .errors import InvalidArgumentError, SiteError

__all__ = ["steering", "Steering"]


class Steering:
    """What a :func:`steering` block applies (returned by ``with ... as s``).

    Attributes:
        modules: ``{site: module path}`` hooked (for ``resid_*`` sites the module whose output
            joins the residual stream: :attr:`rank1fast.models.Carrier.hook`).
        vectors: ``{site: float64 [d_out] array}``: how far each site moves, scale included
            (on Granite the hook adds it divided by ``residual_multiplier``).
    """

    def __init__(self, modules: dict[str, str], vectors: dict[str, np.ndarray]) -> None:
        self.modules = modules
        self.vectors = vectors

    def __repr__(self) -> str:
        norms = ", ".join(f"{s}: |v|={np.linalg.norm(v):.3g}" for s, v in self.vectors.items())
        return f"Steering({norms})"


def steered_vectors(
    vectors: Mapping[str, Any] | str | os.PathLike[str],
    scale: float | Mapping[str, float] = 1.0,
) -> dict[str, np.ndarray]:
    """``{site: scale·v}`` as float64 arrays, from a dict or a vector file.

    Args:
        vectors: ``{site: vector}`` (numpy, torch or lists), or a file for
            :func:`rank1fast.vectors.load`.
        scale: one multiplier, or ``{site: multiplier}`` (missing sites: 1).

    Returns:
        ``{site: float64 [d] array}``.

    Raises:
        InvalidArgumentError: no vectors, a vector that is not numbers, not 1-D or not finite,
            or a scale that is not finite.
    """
    if isinstance(vectors, (str, os.PathLike)):
        from .vectors import load

        vectors = load(vectors)
    if not isinstance(vectors, Mapping):
        raise InvalidArgumentError(
            f"vectors must be {{site: vector}} or a vector file, got {type(vectors).__name__}"
        )
    if not vectors:
        raise InvalidArgumentError("no steering vectors given")
    out = {}
    for site, v in vectors.items():
        if hasattr(v, "detach"):
            v = v.detach().float().cpu().numpy()
        try:
            arr = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"site {site}: the vector is not numbers ({e})") from None
        s = float(scale.get(site, 1.0)) if isinstance(scale, Mapping) else float(scale)
        if arr.ndim != 1 or arr.size == 0:
            raise InvalidArgumentError(f"site {site}: the vector must be 1-D, got {arr.shape}")
        if not (np.isfinite(arr).all() and np.isfinite(s)):
            raise InvalidArgumentError(f"site {site}: the vector or its scale is not finite")
        out[str(site)] = s * arr
    return out


@contextlib.contextmanager
def steering(
    model: Any,
    vectors: Mapping[str, Any] | str | os.PathLike[str],
    scale: float | Mapping[str, float] = 1.0,
) -> Iterator[Steering]:
    """Move each site by ``scale·v`` for every forward pass in the block.

    ``resid_mid.L``/``resid_post.L`` move the residual stream by exactly ``scale·v`` on every
    family (see the module docs and :func:`rank1fast.models.site_carrier`); a module path adds
    ``scale·v`` to that module's output.

    Args:
        model: a transformers model (PEFT wrappers allowed) or a ``(model, tokenizer)`` pair.
        vectors: ``{site: vector}`` with ``resid_mid.L``/``resid_post.L``/module-path sites
            and vectors of the module's output size (the residual width for resid_* sites),
            or a vector file (:func:`rank1fast.vectors.load`: .npy, .pt, .safetensors,
            control-vector GGUF).
        scale: one multiplier for every vector, or ``{site: multiplier}``.

    Yields:
        A :class:`Steering` naming the hooked modules and the vectors moving each site (scale
        included).

    Raises:
        SiteError: a site that does not resolve on this model (``resid_mid.L`` on a
            parallel-residual block has no residual stream to move).
        InvalidArgumentError: a vector whose size is not the module's output size, or one that
            is not 1-D / finite.

    Example:
        >>> model, tok = rank1fast.load_model(None)                        # doctest: +SKIP
        >>> with rank1fast.steering(model, {"resid_post.15": v}, scale=4.0):  # doctest: +SKIP
        ...     out = model.generate(**tok("Hi", return_tensors="pt"), max_new_tokens=20)
    """
    import torch

    from .models import get_module, module_dims, site_carrier, text_config, unwrap_model

    if isinstance(model, tuple):
        model = model[0]
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(
            f"steering needs a loaded model or (model, tokenizer), got {type(model).__name__}; "
            "load one with rank1fast.load_model"
        )
    vecs = steered_vectors(vectors, scale)
    carriers = {}
    for site in vecs:
        carriers[site] = site_carrier(model, site)
    modules = {site: c.hook for site, c in carriers.items()}
    if len(set(modules.values())) != len(modules):
        raise SiteError(f"two sites name the same module: {modules}")
    hidden = getattr(text_config(unwrap_model(model)), "hidden_size", None)
    handles = []
    try:
        for site, path in modules.items():
            module = get_module(model, path)
            try:
                d_out = module_dims(module)[1]
            except SiteError:
                d_out = hidden if carriers[site].site.startswith("resid_") else None
            v = vecs[site]
            if d_out is not None and v.size != d_out:
                raise InvalidArgumentError(
                    f"site {site} ({path}): the vector has {v.size} values, the module outputs "
                    f"{d_out}"
                )
            added = v / carriers[site].gain  # Granite: the residual gets gain x the output
            cache: dict[tuple[Any, Any], torch.Tensor] = {}

            def hook(_m: Any, _i: Any, out: Any, v: np.ndarray = added, cache: dict = cache) -> Any:
                first = out[0] if isinstance(out, tuple) else out
                key = (first.device, first.dtype)
                t = cache.get(key)
                if t is None:
                    t = cache[key] = torch.as_tensor(v, dtype=first.dtype, device=first.device)
                if isinstance(out, tuple):
                    return (first + t, *out[1:])
                return out + t

            handles.append(module.register_forward_hook(hook))
        yield Steering(dict(modules), vecs)
    finally:
        for h in handles:
            h.remove()
