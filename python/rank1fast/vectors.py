"""Steering vectors: from contrastive prompts, from files, and from SAE decoder rows.

A steering vector lives in a site's OUTPUT space (the residual stream for ``resid_mid.L`` and
``resid_post.L``): steering adds it to the output of the site's module at every token. Every
function here returns ``{site: vector}`` with float64 numpy vectors, which is what
:func:`rank1fast.write_adapter` and :func:`rank1fast.verify` take.

File formats read by :func:`load`:

- ``.npy``: a 1-D vector (its site is ``site=``, else the file stem), or a 2-D
  ``[layers, d]`` stack whose row ``L`` is the vector of ``layer_site.format(layer=L)``.
- ``.safetensors`` and ``.pt`` (a tensor or a dict of tensors): each 1-D tensor is the vector
  of the site it is named after; integer names ``"12"`` (repeng's ``directions`` dict) and
  ``direction.12`` (llama.cpp's naming) are layers, mapped like GGUF.
- ``.gguf`` control vectors as llama.cpp's ``cvector-generator`` and repeng's
  ``ControlVector.export_gguf`` write them (``general.architecture = controlvector``, one F32
  tensor ``direction.L`` per layer, ``L >= 1``). llama.cpp adds ``direction.L`` to the output
  of decoder block ``L`` (0-based), after the MLP's residual add (``build_cvec(cur, il)``
  right after ``ffn_inp + ffn_out``), i.e. the residual stream after layer ``L``: our
  ``resid_post.L``. Adding to the MLP output projection's output is the same addition, so
  ``direction.L`` maps to ``resid_post.L`` exactly. llama.cpp never steers ``direction.0``
  and rejects files that hold one; so do we.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DumpError, InvalidArgumentError, PathNotFoundError, SiteError

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

    The site module's OUTPUT (what steering adds to) is recorded for every prompt, reduced to
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

    from .models import get_module, load_model, resolve_sites

    if tokens not in ("mean", "last"):
        raise InvalidArgumentError(f"tokens must be 'mean' or 'last', got {tokens!r}")
    positive, negative = _prompts(positive, "positive"), _prompts(negative, "negative")
    single = isinstance(site, str) and "," not in site
    model, tokenizer = load_model(model, device=device)
    modules = resolve_sites(model, site)
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
    vectors = {s: pos[s] - neg[s] for s in modules}
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
) -> Vectors:
    """Read steering vectors from a ``.npy``, ``.safetensors``, ``.pt`` or control-vector
    ``.gguf`` file.

    Args:
        path: the file (see the module docstring for how each format names its sites).
        site: the site of a file holding one unnamed vector (a 1-D ``.npy`` or a bare
            tensor in a ``.pt``); default: the file stem.
        layer_site: the site of a per-layer vector, formatted with ``layer=L``. The default
            ``"resid_post.{layer}"`` follows llama.cpp: ``direction.L`` is added to the
            residual stream after decoder block ``L``.

    Returns:
        ``{site: float64 vector}`` in file order (layers ascending for GGUF).

    Raises:
        PathNotFoundError: the file does not exist.
        DumpError: an unsupported extension, a malformed file, a tensor that is not a vector,
            or a GGUF that is not a llama.cpp control vector.

    Example:
        >>> vecs = rank1fast.vectors.load("happy.gguf")        # doctest: +SKIP
        >>> sorted(vecs)[:2]                                   # doctest: +SKIP
        ['resid_post.1', 'resid_post.10']
    """
    path = Path(path)
    if not path.is_file():
        raise PathNotFoundError(f"{path}: no such file")
    if "{layer}" not in layer_site:
        raise InvalidArgumentError(f"layer_site {layer_site!r} must contain '{{layer}}'")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            named = _from_array(path, np.load(path, allow_pickle=False), site, layer_site)
        elif suffix == ".safetensors":
            named = _named(path, _read_safetensors(path), layer_site)
        elif suffix in (".pt", ".pth", ".bin"):
            named = _read_torch(path, site, layer_site)
        elif suffix == ".gguf":
            named = _read_gguf(path, layer_site)
        else:
            raise DumpError(
                f"{path}: unsupported vector file (expected .npy, .safetensors, .pt or .gguf)"
            )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        if isinstance(e, (DumpError, InvalidArgumentError)):
            raise
        raise DumpError(f"{path}: cannot read steering vectors: {e}") from e
    if not named:
        raise DumpError(f"{path}: holds no steering vector")
    return named


def _vector(path: Path, name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
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
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - safetensors is in the torch extra
        raise DumpError(f"{path}: reading .safetensors needs the safetensors package") from e
    framework = "numpy"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    if any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values()):
        framework = "pt"  # numpy has no bfloat16
    items = []
    with safe_open(str(path), framework=framework) as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            t = f.get_tensor(key)
            items.append((key, t.float().numpy() if framework == "pt" else t))
    return items


def _read_torch(path: Path, site: str | None, layer_site: str) -> Vectors:
    import torch

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
        arr = np.asarray(v, dtype=np.float64)
        if arr.ndim != 1 or not np.isfinite(arr).all():
            raise InvalidArgumentError(f"vector for {site}: must be 1-D and finite")
        arrays[str(site)] = arr.astype(np.float32)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(arrays, str(tmp), metadata={"format": "rank1fast.vectors"})
    os.replace(tmp, path)
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


def from_sae(
    path: str | os.PathLike[str],
    feature: int,
    *,
    site: str | None = None,
    unit: bool = False,
) -> Vectors:
    """The decoder row of one SAE feature, as a steering vector at the SAE's site.

    Two layouts are read:

    - SAELens: ``cfg.json`` (``d_in``, ``d_sae``, ``hook_name``, or ``metadata.hook_name`` in
      SAELens 6) and ``sae_weights.safetensors`` with ``W_dec`` ``[d_sae, d_in]``;
    - Llama Scope: ``hyperparams.json`` (``d_model``, ``d_sae``, ``hook_point_in``,
      ``hook_point_out``) and ``checkpoints/final.safetensors`` with ``decoder.weight``
      ``[d_model, d_sae]`` (an ``nn.Linear``; ``W_dec`` ``[d_sae, d_model]`` is read too). The
      decoder writes to ``hook_point_out``. Llama Scope normalises activations to norm
      ``sqrt(d_model)``; the row is returned as stored (pick ``scale`` accordingly, or use
      ``unit=True``).

    Args:
        path: the SAE directory (or its ``cfg.json`` / ``hyperparams.json``).
        feature: the feature index, ``0 <= feature < d_sae``.
        site: the site to steer; default: the one the SAE's hook point writes to
            (:func:`site_from_hook`), else the raw hook name.
        unit: scale the row to unit norm.

    Returns:
        ``{site: float64 vector [d_in]}``.

    Raises:
        PathNotFoundError: no SAE config or weights at ``path``.
        DumpError: a config or weights file that does not match either layout.
        InvalidArgumentError: ``feature`` out of range.

    Example:
        >>> rank1fast.vectors.from_sae("saes/blocks.12.hook_resid_post", 4242)   # doctest: +SKIP
        {'resid_post.12': array([...])}
    """
    path = Path(path)
    root = path.parent if path.is_file() else path
    if (root / "cfg.json").is_file():
        cfg_path, weights = root / "cfg.json", root / "sae_weights.safetensors"
        cfg = _json(cfg_path)
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        hook = cfg.get("hook_name") or meta.get("hook_name") or cfg.get("hook_point")
        d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
        keys, transposed = ("W_dec",), False
    elif (root / "hyperparams.json").is_file():
        cfg_path, weights = root / "hyperparams.json", root / "checkpoints" / "final.safetensors"
        cfg = _json(cfg_path)
        hook = cfg.get("hook_point_out") or cfg.get("hook_point_in")
        d_in, d_sae = cfg.get("d_model"), cfg.get("d_sae")
        keys, transposed = ("decoder.weight", "W_dec"), True
    else:
        raise PathNotFoundError(
            f"{root}: no SAE here (expected cfg.json + sae_weights.safetensors from SAELens, "
            "or hyperparams.json + checkpoints/final.safetensors from Llama Scope)"
        )
    if not weights.is_file():
        raise PathNotFoundError(f"{weights}: no such file (SAE weights for {cfg_path})")
    if not isinstance(d_sae, int) or not isinstance(d_in, int):
        raise DumpError(f"{cfg_path}: needs integer d_sae and d_in/d_model")
    if not 0 <= int(feature) < d_sae:
        raise InvalidArgumentError(f"feature {feature} out of range: {cfg_path} has d_sae={d_sae}")
    row = _decoder_row(weights, keys, transposed, int(feature), d_in, d_sae)
    if unit:
        n = float(np.linalg.norm(row))
        if n == 0:
            raise DumpError(f"{weights}: decoder row {feature} is zero")
        row = row / n
    name = site or (site_from_hook(str(hook)) if hook else None) or (str(hook) if hook else None)
    if not name:
        raise SiteError(f"{cfg_path}: names no hook point; pass site=")
    return {name: row}


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DumpError(f"{path}: not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise DumpError(f"{path}: expected a JSON object")
    return data


def _decoder_row(
    weights: Path, keys: tuple[str, ...], transposed: bool, feature: int, d_in: int, d_sae: int
) -> np.ndarray:
    from safetensors import safe_open

    with open(weights, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    key = next((k for k in keys if k in header), None)
    if key is None:
        raise DumpError(f"{weights}: no decoder tensor (looked for {', '.join(keys)})")
    framework = "pt" if header[key].get("dtype") == "BF16" else "numpy"
    with safe_open(str(weights), framework=framework) as f:
        sl = f.get_slice(key)
        shape = tuple(sl.get_shape())
        # decoder.weight is [d_in, d_sae] (nn.Linear); W_dec is [d_sae, d_in].
        if key == "decoder.weight" and transposed and shape == (d_in, d_sae):
            t = sl[:, feature : feature + 1]
        elif shape == (d_sae, d_in):
            t = sl[feature : feature + 1, :]
        else:
            raise DumpError(
                f"{weights} [{key}]: shape {list(shape)}, expected "
                f"{[d_in, d_sae] if key == 'decoder.weight' else [d_sae, d_in]}"
            )
    arr = t.float().numpy() if framework == "pt" else np.asarray(t)
    return np.asarray(arr, dtype=np.float64).reshape(-1)


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
    s.add_argument("-o", "--out", default=None, metavar="OUT.safetensors")
    s.set_defaults(func=_run_show)

    a = vsub.add_parser("sae", help="an SAE decoder row (SAELens or Llama Scope layout)")
    a.add_argument("path", help="the SAE directory")
    a.add_argument("feature", type=int)
    a.add_argument("--site", default=None, help="override the site from the SAE's hook point")
    a.add_argument("--unit", action="store_true", help="scale the row to unit norm")
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
    vecs = load(args.path, site=args.site, layer_site=args.layer_site)
    _print_vectors(vecs)
    if args.out:
        save(vecs, args.out)
    return 0


def _run_sae(args: Any) -> int:
    vecs = from_sae(args.path, args.feature, site=args.site, unit=args.unit)
    save(vecs, args.out)
    _print_vectors(vecs)
    return 0
