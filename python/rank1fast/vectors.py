"""Steering vectors: from contrastive prompts, from files, and from SAE decoder rows.

A steering vector lives in a site's OUTPUT space (the residual stream for ``resid_mid.L`` and
``resid_post.L``): steering adds it to the output of the site's module at every token. Every
function here returns ``{site: vector}`` with float64 numpy vectors, which is what
:func:`rank1fast.write_adapter` and :func:`rank1fast.verify` take.

File formats read by :func:`load`:

- ``.npy``: a 1-D vector (its site is ``site=``, else the file stem), or a 2-D
  ``[layers, d]`` stack whose row ``L`` is the vector of ``layer_site.format(layer=L)``.
  Format versions 1-3, C or Fortran order, little- or big-endian floats and integers; a raw
  2-byte ``'<V2'`` array (how numpy saves ``ml_dtypes.bfloat16``) with ``dtype="bfloat16"``.
  Structured, object and 0-d arrays are refused by name.
- ``.safetensors`` (held to the rules of the reference reader, huggingface/safetensors) and
  ``.pt`` (a tensor or a dict of tensors): each 1-D tensor is the vector
  of the site it is named after; integer names ``"12"`` (repeng's ``directions`` dict) and
  ``direction.12`` (llama.cpp's naming) are layers, mapped like GGUF.
- ``.gguf`` control vectors as llama.cpp's ``cvector-generator`` and repeng's
  ``ControlVector.export_gguf`` write them (``general.architecture = controlvector``, one F32
  tensor ``direction.L`` per layer, ``L >= 1``). llama.cpp adds ``direction.L`` to the output
  of decoder block ``L`` (0-based), after the MLP's residual add (``build_cvec(cur, il)``
  right after ``ffn_inp + ffn_out``), i.e. the residual stream after layer ``L``: our
  ``resid_post.L``. Adding to the MLP output projection's output is the same addition, so
  ``direction.L`` maps to ``resid_post.L`` exactly. llama.cpp never steers ``direction.0``
  and rejects files that hold one; so do we. Like llama.cpp, we refuse direction tensors
  that are not 1-D.

Every file must be the format its extension names (recognised by content: a torch zip named
``.safetensors`` is refused with a message saying what it is). Every failure is a
:class:`~rank1fast.errors.DumpError` naming the file (and tensor); lengths read from a file are
checked against its size before anything is allocated.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _files
from ._fs import write_atomic
from .errors import (
    DumpError,
    InvalidArgumentError,
    PathNotFoundError,
    Rank1Error,
    SiteError,
)

__all__ = ["contrastive", "load", "save", "from_sae", "site_from_hook", "Vectors"]

#: ``{site: float64 vector}``.
Vectors = dict[str, np.ndarray]

#: Site of a per-layer vector (GGUF ``direction.L``, integer keys, rows of a 2-D array).
DEFAULT_LAYER_SITE = "resid_post.{layer}"

_DIRECTION = re.compile(r"^direction\.(-?\d+)$")


# --------------------------------------------------------------------------- contrastive


def contrastive(
    model: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    site: str | Sequence[str],
    *,
    tokens: str = "mean",
    batch_size: int = 8,
    device: str | None = "auto",
    skip_positions: int = 1,
) -> np.ndarray | Vectors:
    """A CAA-style steering vector: mean site output on ``positive`` minus on ``negative``.

    What the site adds to the residual stream (the output of the module steering hooks:
    :attr:`rank1fast.models.Carrier.hook`, times its gain) is recorded for every prompt, reduced to
    one vector per prompt (the mean over its tokens, or its last token) and averaged over the
    prompts of each side; the vector is ``mean(positive) - mean(negative)``.

    Args:
        model: a model id/path/GGUF, None for the built-in default model, or an already loaded
            ``(model, tokenizer)`` (see :func:`rank1fast.models.load_model`).
        positive: prompts showing the behaviour to steer towards.
        negative: prompts showing its opposite (paired with ``positive`` in CAA, but the
            counts may differ).
        site: a site (``resid_mid.L``, ``resid_post.L`` or a module path), or several.
        tokens: ``"mean"``: average over each prompt's tokens at position >=
            ``skip_positions``; ``"last"``: the last token of each prompt.
        batch_size: prompts per forward pass.
        device: where to run a model loaded here (``"auto"``: CUDA, MPS, else CPU).
        skip_positions: with ``tokens="mean"``, leave out the first tokens (the first position
            carries the massive attention-sink activations); a prompt shorter than that keeps
            its last token.

    Returns:
        One float64 vector ``[d_out]`` for a single site; ``{site: vector}`` for several.

    Raises:
        InvalidArgumentError: empty prompt lists or an unknown ``tokens`` mode.
        SiteError: a site the model does not have.

    Example:
        >>> v = rank1fast.vectors.contrastive(
        ...     None, ["I love this."], ["I hate this."], "resid_mid.15")   # doctest: +SKIP
        >>> v.shape                                                         # doctest: +SKIP
        (576,)
    """
    import torch

    from .models import get_module, load_model, site_carriers

    if tokens not in ("mean", "last"):
        raise InvalidArgumentError(f"tokens must be 'mean' or 'last', got {tokens!r}")
    positive, negative = _prompts(positive, "positive"), _prompts(negative, "negative")
    single = isinstance(site, str) and "," not in site
    model, tokenizer = load_model(model, device=device)
    # What steering adds to: for resid_* sites the module whose output joins the residual
    # stream (the post-sublayer norm on Gemma 2/3 and OLMo-2, the sparse block on MoE layers),
    # its output times the block's gain (Granite) being the residual's share.
    carriers = site_carriers(model, site, adapter=False)
    modules = {name: c.hook for name, c in carriers.items()}
    device_ = next(model.parameters()).device

    def side(prompts: list[str]) -> dict[str, np.ndarray]:
        sums = {s: None for s in modules}
        captured: dict[str, torch.Tensor] = {}
        handles = []
        for name, path in modules.items():

            def hook(_m: Any, _i: Any, out: Any, name: str = name) -> None:
                captured[name] = (out[0] if isinstance(out, tuple) else out).detach()

            handles.append(get_module(model, path).register_forward_hook(hook))
        try:
            for start in range(0, len(prompts), batch_size):
                batch = tokenizer(
                    prompts[start : start + batch_size], return_tensors="pt", padding=True
                )
                batch = {k: v.to(device_) for k, v in batch.items()}
                with torch.no_grad():
                    model(**batch)
                weights = _token_weights(batch["attention_mask"], tokens, skip_positions)
                for name in modules:
                    out = captured[name].to(torch.float64)
                    per_prompt = torch.einsum("bt,btd->bd", weights.to(out), out)
                    total = per_prompt.sum(0).cpu().numpy()
                    sums[name] = total if sums[name] is None else sums[name] + total
        finally:
            for h in handles:
                h.remove()
        return {s: v / len(prompts) for s, v in sums.items()}

    pos, neg = side(positive), side(negative)
    vectors = {s: (pos[s] - neg[s]) * carriers[s].gain for s in modules}
    return next(iter(vectors.values())) if single else vectors


def _prompts(prompts: Sequence[str] | str, what: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    out = [str(p) for p in prompts]
    if not out or not all(p.strip() for p in out):
        raise InvalidArgumentError(f"{what} prompts: need at least one non-empty prompt")
    return out


def _token_weights(mask: Any, tokens: str, skip_positions: int) -> Any:
    """Per-token weights ``[batch, seq]`` that average each prompt's selected tokens."""
    import torch

    mask = mask.to(torch.float64)
    lengths = mask.sum(1).long()
    last = torch.zeros_like(mask)
    last[torch.arange(mask.shape[0]), (lengths - 1).clamp(min=0)] = 1.0
    if tokens == "last":
        return last
    keep = mask.clone()
    keep[:, : max(0, skip_positions)] = 0.0
    short = keep.sum(1) == 0
    keep[short] = last[short]
    return keep / keep.sum(1, keepdim=True)


# --------------------------------------------------------------------------- files


def load_sites(path: str | os.PathLike[str], sites: Sequence[str] | None) -> Vectors:
    """:func:`load`, keeping only ``sites`` (all when empty or None); for the CLI commands."""
    from .errors import AdapterError

    vecs = load(path)
    if not sites:
        return vecs
    missing = [s for s in sites if s not in vecs]
    if missing:
        raise AdapterError(f"{path} has no vector for {', '.join(missing)}")
    return {s: vecs[s] for s in sites}


def load(
    path: str | os.PathLike[str],
    *,
    site: str | None = None,
    layer_site: str = DEFAULT_LAYER_SITE,
    dtype: str | None = None,
) -> Vectors:
    """Read steering vectors from a ``.npy``, ``.safetensors``, ``.pt`` or control-vector
    ``.gguf`` file.

    Args:
        path: the file (see the module docstring for how each format names its sites). Its
            content must be the format its extension names: a torch zip called
            ``.safetensors`` is refused with a message saying what it is.
        site: the site of a file holding one unnamed vector (a 1-D ``.npy`` or a bare
            tensor in a ``.pt``); default: the file stem.
        layer_site: the site of a per-layer vector, formatted with ``layer=L``. The default
            ``"resid_post.{layer}"`` follows llama.cpp: ``direction.L`` is added to the
            residual stream after decoder block ``L``.
        dtype: ``"bfloat16"`` to read a ``.npy`` whose dtype is recorded as raw 2-byte
            (``'<V2'``: how numpy saves ``ml_dtypes.bfloat16`` arrays) as bfloat16.

    Returns:
        ``{site: float64 vector}`` in file order (layers ascending for GGUF).

    Raises:
        PathNotFoundError: the file does not exist.
        InvalidArgumentError: the path is a directory.
        DumpError: an unsupported extension, a file that is another format than its name says,
            a malformed file (every safetensors rule of the reference reader), a tensor that is
            not a vector, or a GGUF that is not a llama.cpp control vector. No other exception
            escapes: library errors are wrapped, naming the file.

    Example:
        >>> vecs = rank1fast.vectors.load("happy.gguf")        # doctest: +SKIP
        >>> sorted(vecs)[:2]                                   # doctest: +SKIP
        ['resid_post.1', 'resid_post.10']
    """
    path = Path(path)
    if path.is_dir():
        raise InvalidArgumentError(f"{path}: is a directory, expected a vector file")
    if not path.is_file():
        raise PathNotFoundError(f"{path}: no such file")
    if "{layer}" not in layer_site:
        raise InvalidArgumentError(f"layer_site {layer_site!r} must contain '{{layer}}'")
    suffix = path.suffix.lower()
    if suffix not in _files.EXPECTED:
        raise DumpError(
            f"{path}: unsupported vector file (expected .npy, .safetensors, .pt or .gguf)"
            + (f"; it is {k}" if (k := _files.kind(path)) else "")
        )
    if dtype not in (None, "bfloat16"):
        raise InvalidArgumentError(f"dtype must be None or 'bfloat16', got {dtype!r}")
    try:
        _files.check_kind(path)
        if suffix == ".npy":
            named = _from_array(path, _files.load_npy(path, dtype), site, layer_site)
        elif suffix == ".safetensors":
            named = _named(path, _read_safetensors(path), layer_site)
        elif suffix in (".pt", ".pth", ".bin"):
            named = _read_torch(path, site, layer_site)
        else:
            named = _read_gguf(path, layer_site)
    except Rank1Error:
        raise
    except Exception as e:  # noqa: BLE001 - a library's failure on a bad file, named
        raise DumpError(f"{path}: cannot read steering vectors: {type(e).__name__}: {e}") from e
    if not named:
        raise DumpError(f"{path}: holds no steering vector")
    return named


def _vector(path: Path, name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        raise DumpError(f"{path} [{name}]: a 0-d array (one number), not a steering vector")
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1 or arr.size == 0:
        raise DumpError(f"{path} [{name}]: a steering vector is 1-D, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DumpError(f"{path} [{name}]: holds a NaN or an infinity")
    return arr


def _layer_name(path: Path, key: str, layer: int, layer_site: str) -> str:
    if layer < 1:
        # llama.cpp: "invalid (zero) direction tensor"; block 0's input is never steered.
        raise DumpError(f"{path} [{key}]: layer {layer} is invalid; control vectors start at 1")
    return layer_site.format(layer=layer)


def _named(path: Path, items: Iterable[tuple[str, Any]], layer_site: str) -> Vectors:
    out: Vectors = {}
    for key, value in items:
        m = _DIRECTION.match(key)
        if m:
            name = _layer_name(path, key, int(m.group(1)), layer_site)
        elif re.fullmatch(r"-?\d+", key):
            name = layer_site.format(layer=int(key))
        else:
            name = key
        if name in out:
            raise DumpError(f"{path} [{key}]: a second vector for site {name}")
        out[name] = _vector(path, key, value)
    return out


def _from_array(path: Path, arr: np.ndarray, site: str | None, layer_site: str) -> Vectors:
    if arr.ndim == 2 and arr.shape[0] > 1:
        return {
            layer_site.format(layer=i): _vector(path, f"row {i}", row) for i, row in enumerate(arr)
        }
    return {site or path.stem: _vector(path, site or path.stem, arr)}


def _read_safetensors(path: Path) -> list[tuple[str, np.ndarray]]:
    tensors, _ = _files.safetensors_header(path)
    return [(name, _files.tensor_array(path, t)) for name, t in tensors.items()]


def _read_torch(path: Path, site: str | None, layer_site: str) -> Vectors:
    import torch

    if _files.kind(path) == _files.TORCH_ZIP:
        _files.check_torch_zip(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        return _from_array(path, obj.detach().float().numpy(), site, layer_site)
    if isinstance(obj, Mapping):
        return _named(
            path,
            (
                (str(k), v.detach().float().numpy() if isinstance(v, torch.Tensor) else v)
                for k, v in obj.items()
            ),
            layer_site,
        )
    raise DumpError(f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}")


def _read_gguf(path: Path, layer_site: str) -> Vectors:
    try:
        from gguf import GGMLQuantizationType, GGUFReader
    except ImportError as e:  # pragma: no cover - gguf is in the torch extra
        raise DumpError(f"{path}: reading control vectors needs the gguf package") from e
    _files.check_gguf(path)
    reader = GGUFReader(path)
    field = reader.get_field("general.architecture")
    arch = bytes(field.parts[-1]).decode("utf-8", "replace") if field is not None else None
    if arch != "controlvector":
        raise DumpError(
            f"{path}: general.architecture is {arch!r}, not 'controlvector' (a model file?)"
        )
    layers: list[tuple[int, str, np.ndarray]] = []
    for t in reader.tensors:
        m = _DIRECTION.match(t.name)
        if not m:
            raise DumpError(f"{path} [{t.name}]: not a direction.L tensor")
        if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            raise DumpError(f"{path} [{t.name}]: type {t.tensor_type.name}, expected F32")
        if any(int(n) != 1 for n in t.shape[1:]):
            # llama.cpp (llama_control_vector_load_one): "invalid (non-1D) direction tensor".
            raise DumpError(
                f"{path} [{t.name}]: shape {[int(n) for n in t.shape]}: a direction tensor is "
                "1-D (llama.cpp refuses others)"
            )
        layers.append((int(m.group(1)), t.name, np.asarray(t.data, dtype=np.float64).ravel()))
    layers.sort(key=lambda x: x[0])
    out: Vectors = {}
    for layer, name, data in layers:
        site = _layer_name(path, name, layer, layer_site)
        if site in out:
            out[site] = out[site] + _vector(path, name, data)  # llama.cpp sums duplicates
        else:
            out[site] = _vector(path, name, data)
    sizes = {v.size for v in out.values()}
    if len(sizes) > 1:
        raise DumpError(f"{path}: direction tensors of different sizes {sorted(sizes)}")
    return out


def save(vectors: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``{site: vector}`` to a ``.safetensors`` file (float32, one tensor per site).

    The file is written under a temporary name and renamed. :func:`load` reads it back.

    Args:
        vectors: ``{site: 1-D vector}``.
        path: the output file (``.safetensors``).

    Returns:
        The path written.

    Raises:
        InvalidArgumentError: no vectors, a vector that is not 1-D and finite, or another
            extension.
        Rank1IOError: the file cannot be written (no such folder, no space, read-only);
            nothing is left behind.

    Example:
        >>> rank1fast.vectors.save({"resid_mid.15": v}, "happy.safetensors")  # doctest: +SKIP
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InvalidArgumentError(f"{path}: vectors are saved as .safetensors")
    if not vectors:
        raise InvalidArgumentError("no vectors to save")
    arrays = {}
    for site, v in vectors.items():
        try:
            arr = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"vector for {site}: not numbers ({e})") from None
        if arr.ndim != 1 or not np.isfinite(arr).all():
            raise InvalidArgumentError(f"vector for {site}: must be 1-D and finite")
        arrays[str(site)] = arr.astype(np.float32)
    write_atomic(
        path,
        lambda tmp: save_file(arrays, str(tmp), metadata={"format": "rank1fast.vectors"}),
        "vectors",
    )
    return path


# --------------------------------------------------------------------------- SAEs

_HOOK = re.compile(r"^blocks\.(\d+)\.(?:[a-z_]+\.)?hook_([a-z_]+)$")


def site_from_hook(hook: str) -> str | None:
    """The site a TransformerLens hook point writes to, or None when it has no site.

    ``blocks.L.hook_resid_post`` and ``blocks.L.hook_mlp_out`` -> ``resid_post.L``;
    ``blocks.L.hook_resid_mid`` and ``blocks.L.hook_attn_out`` -> ``resid_mid.L``;
    ``blocks.L.hook_resid_pre`` -> ``resid_post.{L-1}`` (None for L = 0, the embeddings).
    Adding a vector to a block's attention (MLP) output is the same as adding it to the
    residual stream right after it, for pre-norm models (Llama, Mistral, Qwen, GPT-2).

    Example:
        >>> site_from_hook("blocks.12.hook_resid_post")
        'resid_post.12'
    """
    m = _HOOK.match(hook.strip())
    if not m:
        return None
    layer, kind = int(m.group(1)), m.group(2)
    if kind in ("resid_post", "mlp_out"):
        return f"resid_post.{layer}"
    if kind in ("resid_mid", "attn_out"):
        return f"resid_mid.{layer}"
    if kind == "resid_pre" and layer > 0:
        return f"resid_post.{layer - 1}"
    return None


#: The SAE layouts :func:`from_sae` reads, as its "unsupported layout" error lists them.
SAE_LAYOUTS = (
    "SAELens: cfg.json + sae_weights.safetensors (W_dec)",
    "Llama Scope: hyperparams.json + checkpoints/final.safetensors (decoder.weight)",
    "Gemma Scope: params.npz (W_dec), the file or its folder",
    "Gemma Scope 2: params.safetensors (w_dec), the file or its folder",
    "EleutherAI sparsify: layers.N/cfg.json + layers.N/sae.safetensors (W_dec)",
    "Goodfire: a .pt/.pth state dict with encoder_linear / decoder_linear",
    "OpenAI sparse_autoencoder: a .pt state dict with encoder / decoder / pre_bias",
)


def from_sae(
    path: str | os.PathLike[str],
    feature: int,
    *,
    site: str | None = None,
    unit: bool = False,
    model_space: bool = True,
) -> Vectors:
    """The decoder row of one SAE feature, as a steering vector at the SAE's site.

    Layouts read (``SAE_LAYOUTS``), recognised by their files:

    - SAELens: ``cfg.json`` (``d_in``, ``d_sae``, and ``hook_name``, ``hook_point`` before
      SAELens 3, or ``metadata.hook_name`` from SAELens 6) and ``sae_weights.safetensors``
      with ``W_dec`` ``[d_sae, d_in]``.
    - Llama Scope: ``hyperparams.json`` (``d_model``, ``d_sae``, ``hook_point_in``,
      ``hook_point_out``) and ``checkpoints/final.safetensors`` with ``decoder.weight``
      ``[d_model, d_sae]`` (an ``nn.Linear``). The decoder writes to ``hook_point_out``.
      Llama Scope SAEs see activations scaled to norm ``sqrt(d_model)``
      (``norm_activation: "dataset-wise"``: multiplied by
      ``sqrt(d_model) / dataset_average_activation_norm["in"]``) and decode into that
      normalised space; with ``model_space=True`` (the default) the row is multiplied by
      ``dataset_average_activation_norm["out"] / sqrt(d_model)``, which puts it in the
      model's own activation space, where the other layouts' rows already are (SAELens'
      ``normalize_activations="expected_average_only_in"`` undoes the input scale the same
      way). ``model_space=False`` returns the row as stored.
    - Gemma Scope: ``params.npz`` (``W_enc`` ``[d_model, d_sae]``, ``W_dec``
      ``[d_sae, d_model]``), the file or the folder holding it. The site comes from the path
      as the Hugging Face repositories lay it out: ``layer_L`` in a ``...-res`` repository is
      ``blocks.L.hook_resid_post``, in ``...-mlp`` ``blocks.L.hook_mlp_out``; attention SAEs
      read ``hook_z`` (the heads before ``o_proj``), which is no site: pass ``site=``.
    - Gemma Scope 2: ``params.safetensors`` with lowercase ``w_enc`` / ``w_dec`` (as above),
      under ``resid_post[_all]/``, ``mlp_out[_all]/`` or ``attn_out[_all]/`` and a
      ``layer_L_...`` folder (``attn_out`` is ``resid_mid.L``).
    - EleutherAI sparsify: a ``layers.N`` folder with ``cfg.json`` (``d_in``,
      ``num_latents`` or ``expansion_factor``) and ``sae.safetensors`` (``W_dec``
      ``[num_latents, d_in]``). The folder names the module whose output the SAE reads:
      ``layers.N`` (and ``layers.N.mlp``) is ``resid_post.N``, ``layers.N.self_attn``
      ``resid_mid.N``.
    - Goodfire: a ``.pt``/``.pth`` state dict with ``encoder_linear.weight`` ``[d_sae, d_in]``
      and ``decoder_linear.weight`` ``[d_in, d_sae]``; ``-lL`` in the file name (as in
      ``Llama-3.1-8B-Instruct-SAE-l19.pth``) is the output of layer ``L``, ``resid_post.L``.
    - OpenAI sparse_autoencoder: a ``.pt`` state dict with ``encoder.weight``
      ``[n_latents, d_in]``, ``decoder.weight`` ``[d_in, n_latents]`` and ``pre_bias``; the
      folder ``resid_post_mlp...`` / ``resid_delta_mlp...`` with file ``L.pt`` is
      ``resid_post.L``, ``resid_post_attn...`` / ``resid_delta_attn...`` ``resid_mid.L``.

    The decoder's orientation is taken from its shape against ``d_in`` and ``d_sae`` (from the
    config, or from the encoder's shape): either ``[d_sae, d_in]`` or ``[d_in, d_sae]``; any
    other shape is an error. A hook name becomes a site by :func:`site_from_hook`; a site is
    where the vector is added to a module's output (the residual stream for
    ``resid_post.L`` / ``resid_mid.L``).

    Args:
        path: the SAE directory, or its config or weights file.
        feature: the feature index, ``0 <= feature < d_sae``.
        site: the site to steer; default: the one the SAE's hook point writes to, else the raw
            hook name.
        unit: scale the row to unit norm.
        model_space: Llama Scope only: undo the SAE's activation normalisation (see above).

    Returns:
        ``{site: float64 vector [d_in]}``.

    Raises:
        PathNotFoundError: ``path`` does not exist, or a layout's weights file is missing.
        DumpError: an unsupported layout (the message lists the supported ones), or a config or
            weights file that does not match its layout.
        SiteError: the layout names no site and ``site`` is not given.
        InvalidArgumentError: ``feature`` out of range.

    Example:
        >>> rank1fast.vectors.from_sae("saes/blocks.12.hook_resid_post", 4242)   # doctest: +SKIP
        {'resid_post.12': array([...])}
    """
    path = Path(path)
    if not path.exists():
        raise PathNotFoundError(f"{path}: no such file or directory")
    try:
        sae = _sae_layout(path)
        if not 0 <= int(feature) < sae.d_sae:
            raise InvalidArgumentError(
                f"feature {feature} out of range: {sae.source} has d_sae={sae.d_sae}"
            )
        row = sae.row(int(feature)) * sae.scale(model_space)
    except Rank1Error:
        raise
    except Exception as e:  # noqa: BLE001 - a library's failure on a bad file, named
        raise DumpError(f"{path}: cannot read the SAE: {type(e).__name__}: {e}") from e
    if unit:
        n = float(np.linalg.norm(row))
        if n == 0:
            raise DumpError(f"{sae.weights}: decoder row {feature} is zero")
        row = row / n
    if not np.isfinite(row).all():
        raise DumpError(f"{sae.weights}: decoder row {feature} holds a NaN or an infinity")
    hook = sae.hook
    name = site or (site_from_hook(hook) if hook else None) or sae.site or hook
    if not name:
        raise SiteError(f"{sae.source}: {sae.no_site or 'names no hook point'}; pass site=")
    return {name: row}


class _SAE:
    """Where one SAE's decoder is and how to read a row of it."""

    def __init__(
        self,
        layout: str,
        source: Path,
        weights: Path,
        d_in: int,
        d_sae: int,
        read: Any,
        shape: tuple[int, ...],
        *,
        hook: str | None = None,
        site: str | None = None,
        no_site: str | None = None,
        norm: float | None = None,
    ) -> None:
        self.layout, self.source, self.weights = layout, source, weights
        self.d_in, self.d_sae, self.hook, self.site, self.no_site = d_in, d_sae, hook, site, no_site
        self._read, self._norm = read, norm
        if tuple(shape) == (d_sae, d_in):
            self._rows = True
        elif tuple(shape) == (d_in, d_sae):
            self._rows = False
        else:
            raise DumpError(
                f"{weights}: decoder shape {list(shape)} is neither [d_sae, d_in] = "
                f"{[d_sae, d_in]} nor its transpose ({layout})"
            )

    def row(self, feature: int) -> np.ndarray:
        index = (feature,) if self._rows else (slice(None), feature)
        return np.asarray(self._read(index), dtype=np.float64).reshape(-1)

    def scale(self, model_space: bool) -> float:
        if self._norm is None or not model_space:
            return 1.0
        return self._norm / float(np.sqrt(self.d_in))


def _int(cfg: Mapping[str, Any], key: str, source: Path) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise DumpError(f"{source}: needs a positive integer {key!r}, found {v!r}")
    return v


def _safetensors_decoder(
    weights: Path, keys: tuple[str, ...]
) -> tuple[str, tuple[int, ...], Any, dict[str, _files.Tensor]]:
    if not weights.is_file():
        raise PathNotFoundError(f"{weights}: no such file (the SAE's weights)")
    tensors, _ = _files.safetensors_header(weights)
    key = next((k for k in keys if k in tensors), None)
    if key is None:
        raise DumpError(
            f"{weights}: no decoder tensor (looked for {', '.join(keys)}; "
            f"it holds {', '.join(list(tensors)[:8]) or 'nothing'})"
        )
    t = tensors[key]
    if len(t.shape) != 2:
        raise DumpError(f"{weights} [{key}]: the decoder is 2-D, found shape {list(t.shape)}")
    return key, t.shape, lambda index: _files.tensor_array(weights, t, index), tensors


_LAYER_DIR = re.compile(r"^layer_(\d+)(?:_|$)")


def _sae_layout(path: Path) -> _SAE:
    root = path if path.is_dir() else path.parent
    # SAELens
    if (root / "cfg.json").is_file() and not (root / "sae.safetensors").is_file():
        cfg_path = root / "cfg.json"
        cfg = _json(cfg_path)
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        hook = cfg.get("hook_name") or meta.get("hook_name") or cfg.get("hook_point")
        d_in, d_sae = _int(cfg, "d_in", cfg_path), _int(cfg, "d_sae", cfg_path)
        weights = root / "sae_weights.safetensors"
        _, shape, read, _ = _safetensors_decoder(weights, ("W_dec",))
        return _SAE("SAELens", cfg_path, weights, d_in, d_sae, read, shape, hook=_str(hook))
    # EleutherAI sparsify: layers.N/cfg.json + sae.safetensors
    if (root / "sae.safetensors").is_file():
        cfg_path = root / "cfg.json"
        cfg = _json(cfg_path) if cfg_path.is_file() else {}
        weights = root / "sae.safetensors"
        d_in = _int(cfg, "d_in", cfg_path)
        if "num_latents" in cfg and cfg["num_latents"]:
            d_sae = _int(cfg, "num_latents", cfg_path)
        else:
            d_sae = d_in * _int(cfg, "expansion_factor", cfg_path)
        _, shape, read, _ = _safetensors_decoder(weights, ("W_dec", "decoder.weight"))
        m = re.fullmatch(r"(?:model\.)?layers[._](\d+)(\.mlp|\.self_attn|\.attn)?", root.name)
        site = None
        if m:
            kind = "resid_mid" if m.group(2) in (".self_attn", ".attn") else "resid_post"
            site = f"{kind}.{m.group(1)}"
        return _SAE(
            "EleutherAI sparsify",
            cfg_path,
            weights,
            d_in,
            d_sae,
            read,
            shape,
            site=site,
            no_site=f"the folder name {root.name!r} is not layers.N",
        )
    # Llama Scope
    if (root / "hyperparams.json").is_file():
        cfg_path = root / "hyperparams.json"
        cfg = _json(cfg_path)
        hook = cfg.get("hook_point_out") or cfg.get("hook_point_in")
        d_in, d_sae = _int(cfg, "d_model", cfg_path), _int(cfg, "d_sae", cfg_path)
        weights = root / "checkpoints" / "final.safetensors"
        _, shape, read, _ = _safetensors_decoder(weights, ("decoder.weight", "W_dec"))
        norm = None
        norms = cfg.get("dataset_average_activation_norm")
        if cfg.get("norm_activation") == "dataset-wise" and isinstance(norms, dict):
            value = norms.get("out", norms.get("in"))
            if not isinstance(value, (int, float)) or not value > 0:
                raise DumpError(
                    f"{cfg_path}: dataset_average_activation_norm must hold a positive 'out' "
                    f"or 'in', found {norms!r}"
                )
            norm = float(value)
        return _SAE(
            "Llama Scope", cfg_path, weights, d_in, d_sae, read, shape, hook=_str(hook), norm=norm
        )
    # Gemma Scope (params.npz) and Gemma Scope 2 (params.safetensors)
    npz = path if path.is_file() and path.name.endswith(".npz") else root / "params.npz"
    st = path if path.is_file() and path.suffix == ".safetensors" else root / "params.safetensors"
    if npz.is_file() or st.is_file():
        return _gemma_scope(npz if npz.is_file() else st)
    # Goodfire and OpenAI: one torch state dict
    if path.is_file() and path.suffix.lower() in (".pt", ".pth"):
        return _torch_sae(path)
    raise DumpError(f"{path}: unsupported SAE layout; rank1fast reads: " + "; ".join(SAE_LAYOUTS))


def _str(v: Any) -> str | None:
    return str(v) if isinstance(v, str) and v else None


def _gemma_scope(weights: Path) -> _SAE:
    if weights.suffix == ".npz":
        layout = "Gemma Scope"
        try:
            archive = np.load(weights, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DumpError(f"{weights}: not a readable .npz archive: {e}") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DumpError(f"{weights}: not an .npz archive")
        names = set(archive.files)
        enc_key, dec_key = "W_enc", "W_dec"
        if not {enc_key, dec_key} <= names:
            raise DumpError(f"{weights}: needs W_enc and W_dec, it holds {sorted(names)}")
        # The member headers give the shapes without reading the arrays.
        enc_shape = _npz_shape(archive, enc_key, weights)
        dec_shape = _npz_shape(archive, dec_key, weights)
        read = lambda index: archive[dec_key][index]  # noqa: E731
    else:
        layout = "Gemma Scope 2"
        tensors, _ = _files.safetensors_header(weights)
        enc_key, dec_key = "w_enc", "w_dec"
        if not {enc_key, dec_key} <= set(tensors):
            raise DumpError(f"{weights}: needs w_enc and w_dec, it holds {sorted(tensors)}")
        enc_shape, dec_shape = tensors[enc_key].shape, tensors[dec_key].shape
        t = tensors[dec_key]
        read = lambda index: _files.tensor_array(weights, t, index)  # noqa: E731
    if len(enc_shape) != 2:
        raise DumpError(
            f"{weights} [{enc_key}]: expected [d_model, d_sae], found {list(enc_shape)}"
        )
    d_in, d_sae = enc_shape
    site, no_site = None, "the path names no layer_L of a resid/mlp SAE"
    parts = [p.lower() for p in weights.resolve().parts]
    layer = next((int(m.group(1)) for p in parts if (m := _LAYER_DIR.match(p))), None)
    if layer is not None:
        joined = "/".join(parts)
        if re.search(r"(^|/)attn_out(_all)?/", joined):
            site = f"resid_mid.{layer}"
        elif re.search(r"(^|/)(resid_post|mlp_out)(_all)?/", joined) or re.search(
            r"gemma-scope-[^/]*-(res|mlp)(/|$)", joined
        ):
            site = f"resid_post.{layer}"
        elif re.search(r"gemma-scope-[^/]*-att(/|$)", joined):
            no_site = "attention SAEs read hook_z (the heads before o_proj), which is no site"
    return _SAE(layout, weights, weights, d_in, d_sae, read, dec_shape, site=site, no_site=no_site)


def _npz_shape(archive: Any, key: str, weights: Path) -> tuple[int, ...]:
    """The shape of member ``key`` from its header, checked against the member's size (and that
    against its compressed size: deflate expands at most ~1032x), so that numpy's read, which
    allocates what the header says, allocates no more than the file holds."""
    info = archive.zip.getinfo(f"{key}.npy")
    if info.file_size > 1100 * max(info.compress_size, 1) or (
        info.compress_type == zipfile.ZIP_STORED and info.file_size > weights.stat().st_size
    ):
        raise DumpError(f"{weights} [{key}]: claims {info.file_size} bytes, more than it holds")
    with archive.zip.open(info) as f:
        descr, _, shape, start = _files.npy_header(f, info.file_size, f"{weights} [{key}]")
    need = int(np.prod(shape, dtype=np.float64)) * np.dtype(descr).itemsize
    if start + need > info.file_size:
        raise DumpError(
            f"{weights} [{key}]: shape {list(shape)} needs {need} bytes, the member holds "
            f"{info.file_size - start}"
        )
    return tuple(shape)


def _torch_sae(path: Path) -> _SAE:
    import torch

    _files.check_kind(path)
    if _files.kind(path) == _files.TORCH_ZIP:
        _files.check_torch_zip(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise DumpError(f"{path}: expected a state dict, got {type(sd).__name__}")

    def shape(key: str) -> tuple[int, ...]:
        t = sd[key]
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise DumpError(f"{path} [{key}]: expected a 2-D tensor")
        return tuple(t.shape)

    def reader(key: str) -> Any:
        return lambda index: sd[key][index].detach().float().numpy()

    if "encoder_linear.weight" in sd and "decoder_linear.weight" in sd:
        d_sae, d_in = shape("encoder_linear.weight")
        m = re.search(r"-l(\d+)$", path.stem, re.IGNORECASE)
        return _SAE(
            "Goodfire",
            path,
            path,
            d_in,
            d_sae,
            reader("decoder_linear.weight"),
            shape("decoder_linear.weight"),
            site=f"resid_post.{m.group(1)}" if m else None,
            no_site="the file name has no -lL layer",
        )
    if "encoder.weight" in sd and "decoder.weight" in sd and "pre_bias" in sd:
        d_sae, d_in = shape("encoder.weight")
        site = None
        folder = path.parent.name.lower()
        if path.stem.isdigit():
            if folder.startswith(("resid_post_mlp", "resid_delta_mlp")):
                site = f"resid_post.{int(path.stem)}"
            elif folder.startswith(("resid_post_attn", "resid_delta_attn")):
                site = f"resid_mid.{int(path.stem)}"
        return _SAE(
            "OpenAI sparse_autoencoder",
            path,
            path,
            d_in,
            d_sae,
            reader("decoder.weight"),
            shape("decoder.weight"),
            site=site,
            no_site="the path is not <location>/<layer>.pt",
        )
    raise DumpError(
        f"{path}: unsupported SAE layout (a state dict with {', '.join(list(map(str, sd))[:8])}); "
        "rank1fast reads: " + "; ".join(SAE_LAYOUTS)
    )


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DumpError(f"{path}: not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise DumpError(f"{path}: expected a JSON object")
    return data


# --------------------------------------------------------------------------- CLI


def add_cli(sub: Any) -> None:
    """Register ``rank1fast vector {contrastive,show,sae}``."""
    p = sub.add_parser(
        "vector",
        help="make, read and convert steering vectors",
        description="Steering vectors as {site: vector} .safetensors files: from contrastive "
        "prompts, from .npy/.pt/.safetensors/control-vector .gguf files, or from an SAE "
        "decoder row.",
    )
    vsub = p.add_subparsers(dest="vector_command", metavar="ACTION", required=True)

    c = vsub.add_parser("contrastive", help="mean site-output difference of prompt pairs (CAA)")
    c.add_argument(
        "--site",
        action="append",
        required=True,
        dest="sites",
        metavar="S",
        help="resid_mid.L, resid_post.L or a module path (repeatable)",
    )
    c.add_argument(
        "--positive",
        required=True,
        metavar="FILE",
        help="prompts towards the behaviour, one per line",
    )
    c.add_argument(
        "--negative", required=True, metavar="FILE", help="prompts away from it, one per line"
    )
    c.add_argument("--model", default=None, help="model id, directory or .gguf (default: built-in)")
    c.add_argument("--tokens", choices=("mean", "last"), default="mean")
    c.add_argument("--device", default="auto")
    c.add_argument("-o", "--out", required=True, metavar="OUT.safetensors")
    c.set_defaults(func=_run_contrastive)

    s = vsub.add_parser("show", help="list the vectors of a file (and convert it with -o)")
    s.add_argument("path", help=".npy, .pt, .safetensors or control-vector .gguf")
    s.add_argument("--site", default=None, help="site of a single unnamed vector")
    s.add_argument(
        "--layer-site",
        default=DEFAULT_LAYER_SITE,
        help="site of per-layer vectors (default %(default)s, llama.cpp's convention)",
    )
    s.add_argument(
        "--dtype",
        choices=("bfloat16",),
        default=None,
        help="read a raw 2-byte .npy ('<V2', an ml_dtypes array) as bfloat16",
    )
    s.add_argument("-o", "--out", default=None, metavar="OUT.safetensors")
    s.set_defaults(func=_run_show)

    a = vsub.add_parser(
        "sae",
        help="an SAE decoder row (SAELens, Llama Scope, Gemma Scope 1/2, EleutherAI sparsify, "
        "Goodfire, OpenAI layouts)",
    )
    a.add_argument("path", help="the SAE directory, or its config or weights file")
    a.add_argument("feature", type=int)
    a.add_argument("--site", default=None, help="override the site from the SAE's hook point")
    a.add_argument("--unit", action="store_true", help="scale the row to unit norm")
    a.add_argument(
        "--as-stored",
        action="store_true",
        help="Llama Scope: keep the row in the SAE's normalised space (default: the model's)",
    )
    a.add_argument("-o", "--out", required=True, metavar="OUT.safetensors")
    a.set_defaults(func=_run_sae)


def _lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise PathNotFoundError(f"{p}: no such file")
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _print_vectors(vectors: Mapping[str, np.ndarray]) -> None:
    width = max(len(s) for s in vectors)
    for site, v in vectors.items():
        print(f"{site.ljust(width)}  size {v.size}  norm {np.linalg.norm(v):.4g}")


def _run_contrastive(args: Any) -> int:
    vecs = contrastive(
        args.model,
        _lines(args.positive),
        _lines(args.negative),
        args.sites,
        tokens=args.tokens,
        device=args.device,
    )
    if isinstance(vecs, np.ndarray):
        vecs = {args.sites[0]: vecs}
    save(vecs, args.out)
    _print_vectors(vecs)
    return 0


def _run_show(args: Any) -> int:
    vecs = load(args.path, site=args.site, layer_site=args.layer_site, dtype=args.dtype)
    _print_vectors(vecs)
    if args.out:
        save(vecs, args.out)
    return 0


def _run_sae(args: Any) -> int:
    vecs = from_sae(
        args.path, args.feature, site=args.site, unit=args.unit, model_space=not args.as_stored
    )
    save(vecs, args.out)
    _print_vectors(vecs)
    return 0
