"""llama.cpp interop: PEFT LoRA adapters and steering vectors as GGUF files.

Three conversions, each written to a temporary name and renamed (nothing half-written):

- :func:`lora_to_gguf`: a PEFT LoRA adapter directory (rank1fast's, or any PEFT LoRA on the
  attention and MLP projections of a Llama-family model) as a llama.cpp LoRA adapter
  (``llama-server -m model.gguf --lora steer.gguf``), laid out exactly as llama.cpp's own
  ``convert_lora_to_gguf.py`` writes it;
- :func:`gguf_to_lora`: a llama.cpp LoRA GGUF back into a PEFT adapter directory;
- :func:`control_vector_to_gguf`: steering vectors at ``resid_post`` sites as a llama.cpp control
  vector (``llama-server --control-vector steer.gguf``), as llama.cpp's ``cvector-generator`` and
  repeng's ``ControlVector.export_gguf`` write them. Reading one back is
  :func:`rank1fast.vectors.load`.

The LoRA GGUF. ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``
(float32), ``general.architecture`` the base model's llama.cpp architecture (llama.cpp refuses an
adapter whose architecture differs from the model's). Per adapted linear module two tensors,
named after the module's weight in the model GGUF (``model.layers.5.mlp.down_proj`` ->
``blk.5.ffn_down.weight``): ``<name>.lora_a`` with GGUF shape ``[n_in, r]`` (numpy ``[r, n_in]``,
PEFT's ``lora_A``) and ``<name>.lora_b`` with GGUF shape ``[r, n_out]`` (numpy ``[n_out, r]``,
PEFT's ``lora_B``). llama.cpp adds ``scale * alpha / r * B (A x)`` with ``r`` the rank of that
tensor pair (``scale`` is ``--lora-scaled``, 1 for ``--lora``), which is PEFT's ``lora_alpha / r``.
Where PEFT's scaling differs from ``alpha / r`` (``use_rslora``, ``alpha_pattern``) the
difference is folded into ``lora_b``.

q_proj and k_proj on ``llama``: llama.cpp's converter permutes the rows of the query and key
projections (HF's rotate-half RoPE layout -> GGML's interleaved one), ``permute(W, n_head)`` for
q and ``permute(W, n_head_kv)`` for k. For a LoRA the permutation applies to the output rows, i.e.
to ``lora_b``, exactly as ``convert_lora_to_gguf.py`` does. It needs the head counts: pass the
base model (``base=``: its ``.gguf``, or a Hugging Face directory with ``config.json``).

Control vectors. llama.cpp adds ``direction.L`` (one F32 tensor per layer) to the output of
decoder block ``L`` after the MLP's residual add: in its Llama graph
``cur = ggml_add(ctx0, cur, ffn_inp); cur = build_cvec(cur, il);`` and
``llama_adapter_cvec::apply_to(ctx, cur, il)`` adds ``tensors[il]``, which the loader fills from
``direction.il``. That is the residual stream after layer ``L``: rank1fast's ``resid_post.L``
(the output of layer ``L``'s ``mlp.down_proj``; adding to a module's output is the same addition).
llama.cpp has no tensor for block 0 (``direction.0`` is rejected), so ``resid_post.0`` cannot be a
control vector. ``resid_mid.L`` (between attention and MLP) has no control-vector equivalent;
serve it as a LoRA. ``controlvector.model_hint`` (repeng requires it) and
``controlvector.layer_count`` are written; llama.cpp reads neither.

llama.cpp itself (llama-cpp-python): :func:`set_control_vector` steers a loaded model the way
``--control-vector`` does. Loading a model on every CPU: :func:`load_llama` and
:func:`no_repack`. By default llama.cpp repacks quantized weights into its CPU backend's "extra
buffer types" (``use_extra_bufts`` in ``llama_model_params``); on CPUs with AMX (Intel Xeon
Sapphire Rapids and later) that is the AMX buffer, and llama.cpp as built by llama-cpp-python
0.3.36 ends in a segmentation fault on the first decode there (ggml-org/llama.cpp#20824). With
``use_extra_bufts = False`` the weights stay in plain CPU buffers and decode correctly on every
CPU; llama-cpp-python's ``Llama`` takes no argument for it (its ``**kwargs`` are ignored), so
these helpers set it on the parameters ``Llama`` starts from. The command-line equivalent is
``llama-server --no-repack`` (``-nr``; environment ``LLAMA_ARG_REPACK=0``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _files
from ._peft import CONFIG_FILE, WEIGHTS_FILE, lora_pairs, peft_config, peft_scaling, read_peft
from .errors import (
    AdapterError,
    DumpError,
    InvalidArgumentError,
    PathNotFoundError,
    Rank1Error,
    Rank1IOError,
)

__all__ = [
    "lora_to_gguf",
    "gguf_to_lora",
    "control_vector_to_gguf",
    "gguf_tensor_name",
    "control_vector_layer",
    "load_llama",
    "no_repack",
    "set_control_vector",
    "ARCHITECTURES",
    "add_cli",
]

#: llama.cpp architectures this module maps, and whether llama.cpp's converter permutes the
#: rows of q_proj/k_proj for them. Only ``llama`` has been checked against llama.cpp itself;
#: qwen2/qwen3 follow the converter (a plain name map).
ARCHITECTURES: dict[str, bool] = {"llama": True, "qwen2": False, "qwen3": False}
#: Hugging Face ``model_type`` -> llama.cpp architecture (Mistral converts as ``llama``).
_HF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_DTYPES = {"float32": np.float32, "float16": np.float16}

#: HF module (relative to the causal LM) -> llama.cpp tensor stem.
_PROJ = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_STEM = {v: k for k, v in _PROJ.items()}
_MODULE = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.("
    + "|".join(re.escape(k) for k in _PROJ)
    + r")$"
)
_GGUF_LORA = re.compile(r"^blk\.(\d+)\.(" + "|".join(_STEM) + r")\.weight\.lora_(a|b)$")
_RESID_POST = re.compile(r"^resid_post\.(-?\d+)$")
_RESID_MID = re.compile(r"^resid_mid\.(-?\d+)$")
_DOWN_PROJ = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.mlp\.down_proj$")

_META_CONFIG = "rank1fast.peft_config"
_META_INFO = "rank1fast.adapter_info"
_META_HEADS = "rank1fast.head_count"
_META_KV_HEADS = "rank1fast.head_count_kv"
_META_FOLDED = "rank1fast.scaling_folded"

INFO_FILE = "rank1fast.json"


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency of the torch extra
        raise InvalidArgumentError("GGUF files need the gguf package: pip install gguf") from e
    return gguf


# --------------------------------------------------------------------------- llama.cpp itself

#: Held while :func:`no_repack` has replaced llama-cpp-python's default model parameters.
_REPACK_LOCK = threading.RLock()


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        raise InvalidArgumentError(
            "loading a GGUF in llama.cpp needs llama-cpp-python: pip install llama-cpp-python"
        ) from e
    return llama_cpp


@contextlib.contextmanager
def no_repack() -> Iterator[None]:
    """Within the block, every ``llama_cpp.Llama`` loads its weights without repacking.

    llama-cpp-python's ``Llama`` starts from ``llama_cpp.llama_model_default_params()`` and takes
    no argument for ``use_extra_bufts`` (llama.cpp's ``llama_model_params``: "use extra buffer
    types (used for weight repacking)"). This context replaces that function in
    ``llama_cpp.llama_cpp``, the module ``Llama`` calls it from, with one that returns the same
    parameters with ``use_extra_bufts = False``, and restores it on exit. Weights then stay in
    plain CPU buffers: what ``llama-server --no-repack`` does, and what keeps llama.cpp from the
    segmentation fault of its AMX buffer on Intel Sapphire Rapids and later CPUs
    (ggml-org/llama.cpp#20824). On other CPUs it only skips a load-time optimisation (interleaved
    layouts of some quantization types for faster matmuls), so decoding may be slower there.
    Use it where ``Llama`` is built for you (llama-cpp-python's server,
    ``Llama.from_pretrained``); :func:`load_llama` wraps the common case.

    The replacement is process-wide while the block runs: a ``Llama`` built by another thread
    meanwhile also loads without repacking. Blocks nest; a lock keeps concurrent blocks from
    restoring each other's replacement out of order.

    Raises:
        InvalidArgumentError: llama-cpp-python is not installed, or its ``llama_model_params``
            has no ``use_extra_bufts`` field (llama.cpp before that parameter existed).

    Example:
        >>> with no_repack():  # doctest: +SKIP
        ...     llm = llama_cpp.Llama.from_pretrained("org/repo", "*Q4_K_M.gguf")
    """
    llama_cpp = _llama_cpp()
    native = llama_cpp.llama_cpp
    if "use_extra_bufts" not in {f[0] for f in native.llama_model_params._fields_}:
        raise InvalidArgumentError(
            f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')} has no use_extra_bufts "
            "model parameter; weight repacking cannot be turned off from Python with it"
        )
    with _REPACK_LOCK:
        original = native.llama_model_default_params

        def default_params() -> Any:
            params = original()
            params.use_extra_bufts = False
            return params

        native.llama_model_default_params = default_params
        try:
            yield
        finally:
            native.llama_model_default_params = original


def load_llama(model_path: str | os.PathLike[str], *, repack: bool = False, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(model_path, **kwargs)``, without llama.cpp's weight repacking.

    The model loads with ``use_extra_bufts = False`` (see :func:`no_repack`), which runs on every
    CPU, AMX ones (Intel Sapphire Rapids and later) included; ``repack=True`` keeps llama.cpp's
    default instead (faster matmuls on some CPUs; crashes on AMX ones with llama-cpp-python
    0.3.36).

    Args:
        model_path: The model's ``.gguf`` file.
        repack: Let llama.cpp repack the weights into its extra buffer types (its default).
        **kwargs: Passed to ``llama_cpp.Llama`` (``n_ctx``, ``lora_path``, ``logits_all``, ...).

    Returns:
        The ``llama_cpp.Llama``; ``llm.model_params.use_extra_bufts`` shows what it loaded with.

    Raises:
        PathNotFoundError: ``model_path`` does not exist.
        InvalidArgumentError: llama-cpp-python is missing or has no ``use_extra_bufts``.

    Example:
        >>> llm = load_llama("model.Q4_1.gguf", lora_path="happy-lora.gguf")  # doctest: +SKIP
        >>> llm.create_completion("Today", max_tokens=8)["choices"][0]["text"]  # doctest: +SKIP
    """
    path = Path(model_path)
    if not path.is_file():
        raise PathNotFoundError(f"{path}: no such model file")
    llama_cpp = _llama_cpp()
    with contextlib.nullcontext() if repack else no_repack():
        return llama_cpp.Llama(model_path=os.fspath(path), **kwargs)


def set_control_vector(
    llm: Any, vectors: Mapping[str, Any] | str | os.PathLike[str] | None, *, scale: float = 1.0
) -> None:
    """Steer a llama-cpp-python model with vectors at ``resid_post`` sites (a control vector).

    What ``llama-server --control-vector-scaled FILE SCALE`` does (``common_control_vector_load``
    then ``llama_set_adapter_cvec``): ``resid_post.L`` goes to ``direction.L``, at offset
    ``(L - 1) * n_embd`` of one float32 buffer that starts at layer 1, applied to layers
    ``1 .. n_layer``; llama.cpp copies it, so ``vectors`` may be freed afterwards. llama-cpp-python
    exposes ``llama_set_adapter_cvec`` but no ``Llama`` argument or server option for it.

    Args:
        llm: A ``llama_cpp.Llama``.
        vectors: ``{site: vector}`` (``resid_post.L`` with ``1 <= L < n_layer``, float vectors of
            the model's ``n_embd``), a file :func:`rank1fast.vectors.load` reads (a control
            vector ``.gguf`` as :func:`control_vector_to_gguf` writes it), or ``None`` to clear
            the control vector.
        scale: Multiplies every vector.

    Raises:
        AdapterError: A site that is not ``resid_post.L`` with ``1 <= L < n_layer``, two vectors
            for one layer, a vector that is not 1-D of size ``n_embd``, or non-finite values.
        Rank1Error: llama.cpp refused the buffer (its return code is in the message).

    Example:
        >>> llm = load_llama("model.Q4_1.gguf")                           # doctest: +SKIP
        >>> set_control_vector(llm, "happy-cv.gguf", scale=0.5)            # doctest: +SKIP
    """
    llama_cpp = _llama_cpp()
    n_embd = int(llm.n_embd())
    if vectors is None:
        rc = llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, n_embd, -1, -1)
        if rc != 0:
            raise Rank1Error(f"llama_set_adapter_cvec returned {rc} clearing the control vector")
        return
    if not isinstance(vectors, Mapping):
        from .vectors import load

        vectors = load(vectors)
    n_layer = int(llama_cpp.llama_model_n_layer(llm.model))
    layers: dict[int, np.ndarray] = {}
    for site, v in vectors.items():
        layer = control_vector_layer(str(site))
        if layer >= n_layer:
            raise AdapterError(f"site {site}: the model has layers 0..{n_layer - 1}")
        if layer in layers:
            raise AdapterError(f"site {site}: a second vector for direction.{layer}")
        with np.errstate(over="ignore", invalid="ignore"):
            arr = float(scale) * np.asarray(v, dtype=np.float64)
        if arr.shape != (n_embd,):
            raise AdapterError(f"site {site}: expected a vector of {n_embd}, got {arr.shape}")
        if not np.isfinite(arr).all():
            raise AdapterError(f"site {site}: the scaled vector is not finite")
        layers[layer] = arr
    if not layers:
        raise AdapterError("no steering vectors given")
    data = np.zeros(n_embd * max(layers), dtype=np.float32)
    for layer, arr in layers.items():
        data[(layer - 1) * n_embd : layer * n_embd] = arr
    ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    rc = llama_cpp.llama_set_adapter_cvec(llm.ctx, ptr, data.size, n_embd, 1, n_layer)
    if rc != 0:
        raise Rank1Error(f"llama_set_adapter_cvec returned {rc} for layers {sorted(layers)}")


# --------------------------------------------------------------------------- names


def gguf_tensor_name(module: str) -> str:
    """The llama.cpp weight a Hugging Face Llama-family linear module becomes.

    Example:
        >>> gguf_tensor_name("model.layers.5.mlp.down_proj")
        'blk.5.ffn_down.weight'
        >>> gguf_tensor_name("base_model.model.model.layers.0.self_attn.o_proj")
        'blk.0.attn_output.weight'

    Raises:
        AdapterError: a module llama.cpp's LoRA loader has no slot for here (embeddings,
            ``lm_head``, anything but the q/k/v/o and gate/up/down projections).
    """
    m = _MODULE.match(module)
    if not m:
        raise AdapterError(
            f"module {module!r}: only the attention (q/k/v/o_proj) and MLP (gate/up/down_proj) "
            "projections of model.layers.N map to llama.cpp LoRA tensors"
        )
    return f"blk.{int(m.group(1))}.{_PROJ[m.group(2)]}.weight"


def _hf_module(name: str) -> str:
    """``blk.5.ffn_down.weight`` -> ``model.layers.5.mlp.down_proj``."""
    m = re.match(r"^blk\.(\d+)\.(\w+)\.weight$", name)
    if not m or m.group(2) not in _STEM:
        raise AdapterError(f"llama.cpp tensor {name!r} has no Hugging Face module here")
    return f"model.layers.{int(m.group(1))}.{_STEM[m.group(2)]}"


def control_vector_layer(site: str) -> int:
    """The ``direction.L`` index of a site, for a llama.cpp control vector.

    ``resid_post.L`` (and its module, ``model.layers.L.mlp.down_proj``) is the residual stream
    after decoder block ``L``, where llama.cpp adds ``direction.L``.

    Example:
        >>> control_vector_layer("resid_post.15")
        15

    Raises:
        AdapterError: ``resid_mid.L`` (no control-vector equivalent), ``resid_post.0`` (llama.cpp
            never steers block 0's output), a negative layer, or any other site.
    """
    m = _RESID_POST.match(site) or _DOWN_PROJ.match(site)
    if m:
        layer = int(m.group(1))
        if layer < 0:
            raise AdapterError(
                f"site {site}: name the layer by its index from 0 (a control vector file does "
                "not know the model's layer count)"
            )
        if layer == 0:
            raise AdapterError(
                f"site {site}: llama.cpp has no control vector for the output of block 0 (it "
                "rejects direction.0); steer resid_post.1 or later, or serve it as a LoRA "
                "(rank1fast gguf lora)"
            )
        return layer
    if _RESID_MID.match(site):
        raise AdapterError(
            f"site {site}: a control vector adds to the residual stream after a whole decoder "
            "block (llama.cpp's direction.L is resid_post.L); resid_mid is added between "
            "attention and MLP and has no control-vector equivalent. Serve it as a LoRA instead "
            "(rank1fast gguf lora ADAPTER OUT.gguf)"
        )
    raise AdapterError(
        f"site {site!r}: a llama.cpp control vector holds only resid_post.L sites (L >= 1)"
    )


# --------------------------------------------------------------------------- base model


@dataclass
class _Base:
    """What the base model tells the conversion: architecture, head counts, tensor shapes."""

    arch: str | None = None
    n_head: int | list[int] | None = None
    n_head_kv: int | list[int] | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # GGUF ne order
    source: str | None = None

    def heads(self, layer: int, kv: bool) -> int | None:
        value = self.n_head_kv if kv else self.n_head
        if kv and value is None:
            value = self.n_head
        if isinstance(value, list):
            return int(value[layer]) if layer < len(value) else None
        return None if value is None else int(value)


def _field(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    if f is None:
        return None
    if hasattr(f, "contents"):
        return f.contents()
    value = f.parts[f.data[0]] if f.data else None  # gguf < 0.11: scalar or string only
    if value is None:
        return None
    if value.dtype == np.uint8:
        return bytes(value).decode("utf-8", "replace")
    return value[0].item() if value.size == 1 else value.tolist()


def _load_base(base: str | os.PathLike[str] | None) -> _Base:
    if base is None:
        return _Base()
    path = Path(base)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PathNotFoundError(
            f"{base}: no such base model (a .gguf, or a directory with config.json)"
        )
    if path.suffix.lower() == ".gguf":
        gguf = _gguf()
        try:
            _files.check_gguf(path)
            reader = gguf.GGUFReader(path)
        except DumpError:
            raise
        except Exception as e:  # noqa: BLE001 - gguf-py's failure on a bad file, named
            raise DumpError(f"{path}: not a readable GGUF file: {e}") from e
        arch = _field(reader, "general.architecture")
        kind = _field(reader, "general.type")
        if arch in ("controlvector",) or kind == "adapter":
            raise InvalidArgumentError(f"{path}: an adapter, not a base model")
        return _Base(
            arch=arch,
            n_head=_field(reader, f"{arch}.attention.head_count"),
            n_head_kv=_field(reader, f"{arch}.attention.head_count_kv"),
            shapes={t.name: tuple(int(x) for x in t.shape) for t in reader.tensors},
            source=str(path),
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DumpError(f"{path}: unreadable config: {e}") from e
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    model_type = str(config.get("model_type", ""))
    if model_type not in _HF_ARCH:
        raise AdapterError(
            f"{path}: model_type {model_type!r} is not one this module maps to llama.cpp "
            f"({', '.join(_HF_ARCH)})"
        )
    return _Base(
        arch=_HF_ARCH[model_type],
        n_head=config.get("num_attention_heads"),
        n_head_kv=config.get("num_key_value_heads"),
        source=str(path),
    )


def _arch(base: _Base, arch: str | None) -> str:
    if arch is not None and base.arch is not None and arch != base.arch:
        raise AdapterError(f"arch={arch!r}, but the base model {base.source} is {base.arch!r}")
    chosen = arch or base.arch or "llama"
    if chosen not in ARCHITECTURES:
        raise AdapterError(
            f"architecture {chosen!r}: only {', '.join(ARCHITECTURES)} are mapped to llama.cpp "
            "LoRA tensors"
        )
    return chosen


def _permute(w: np.ndarray, n_head: int, inverse: bool = False) -> np.ndarray:
    """llama.cpp's q/k row permutation (``LlamaModel.permute``) of ``w``'s rows, or its inverse."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise AdapterError(f"{rows} rows do not split into {n_head} heads of an even size")
    half = rows // n_head // 2
    if inverse:
        return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- PEFT -> GGUF


def _check_config(config: dict[str, Any], where: Path) -> None:
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{where}: peft_type {config.get('peft_type')!r}; only LORA converts")
    refused = {
        "use_dora": "DoRA (use_dora) has no llama.cpp equivalent",
        "lora_bias": "LoRA biases (lora_bias) are not loaded by llama.cpp",
        "modules_to_save": "modules_to_save (full trained modules) are not LoRA tensors",
    }
    for key, why in refused.items():
        if config.get(key):
            raise AdapterError(f"{where}: {why}")


def _llama_scale(alpha: float, rank: int) -> float:
    """llama.cpp's multiplier of ``B A x`` (``--lora``): ``alpha / r``, or 1 when alpha is 0."""
    return alpha / rank if alpha else 1.0


def lora_to_gguf(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write a PEFT LoRA adapter directory as a llama.cpp LoRA GGUF.

    Args:
        adapter: the PEFT adapter directory (``adapter_config.json`` and
            ``adapter_model.safetensors`` or ``.bin``).
        out: the ``.gguf`` file to write.
        base: the base model: its ``.gguf`` (the architecture, the head counts and every
            tensor's shape are checked against it) or a Hugging Face directory / ``config.json``.
            Needed for LoRAs on q_proj/k_proj of ``llama`` models (the row permutation).
        arch: the llama.cpp architecture (:data:`ARCHITECTURES`); default: the base model's, else
            ``"llama"``.
        dtype: ``"float32"`` (default, what the converter writes) or ``"float16"``.
        overwrite: replace ``out`` if it exists.

    Returns:
        The file written.

    Raises:
        AdapterError: not a PEFT LoRA directory, a module llama.cpp has no LoRA slot for (here:
            anything but q/k/v/o/gate/up/down projections), DoRA, LoRA biases,
            ``modules_to_save``, q/k LoRAs on ``llama`` without head counts, shapes that do not
            match the base model, or ``out`` existing.
        PathNotFoundError: ``adapter`` or ``base`` does not exist.

    Example:
        >>> base = "SmolLM2-135M-Instruct.Q4_1.gguf"
        >>> rank1fast.llamacpp.lora_to_gguf("happy-lora", "happy.gguf", base=base)  # doctest: +SKIP
        PosixPath('happy.gguf')
    """
    adapter, out = Path(adapter), Path(out)
    if not adapter.is_dir():
        raise PathNotFoundError(f"{adapter}: no such adapter directory")
    if dtype not in _DTYPES:
        raise AdapterError(f"dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
    _check_file_out(out, overwrite)
    config, tensors = read_peft(adapter)
    _check_config(config, adapter)
    info_path = adapter / INFO_FILE
    info = info_path.read_text() if info_path.is_file() else None
    base_info = _load_base(base)
    arch_ = _arch(base_info, arch)

    pairs = lora_pairs(tensors, adapter, "llama.cpp loads only LoRA factors of linear modules")

    alpha = float(config.get("lora_alpha", config.get("r", 8)))
    written: dict[str, np.ndarray] = {}
    folded = False
    permuted = False
    for module, (a, b) in pairs.items():
        name = gguf_tensor_name(module)
        layer = int(name.split(".")[1])
        rank = a.shape[0]
        # PEFT's scaling for this module, against what llama.cpp will apply.
        factor = peft_scaling(config, module) / _llama_scale(alpha, rank)
        if factor != 1.0:
            b = b * factor
            folded = True
        stem = name.split(".")[2]
        if ARCHITECTURES[arch_] and stem in ("attn_q", "attn_k"):
            heads = base_info.heads(layer, kv=stem == "attn_k")
            if heads is None:
                raise AdapterError(
                    f"{adapter}: {module}: llama.cpp stores the query/key rows of llama models "
                    "permuted, and permuting lora_B needs the base model's head counts: pass "
                    "base= (the model .gguf or its config.json directory)"
                )
            b = _permute(b, heads)
            permuted = True
        shape = base_info.shapes.get(name)
        if base_info.shapes and shape is None:
            raise AdapterError(
                f"{adapter}: {module} -> {name}, which the base model {base_info.source} does "
                "not have"
            )
        if shape is not None and tuple(shape[:2]) != (a.shape[1], b.shape[0]):
            raise AdapterError(
                f"{adapter}: {module}: the LoRA maps {a.shape[1]} -> {b.shape[0]} but "
                f"{name} in {base_info.source} is {shape[0]} -> {shape[1]}"
            )
        np_dtype = _DTYPES[dtype]
        for suffix, t in (("lora_a", a), ("lora_b", b)):
            arr = np.ascontiguousarray(t, dtype=np_dtype)
            if not np.isfinite(arr).all():
                raise AdapterError(f"{adapter}: {module}: {suffix} is not finite as {dtype}")
            written[f"{name}.{suffix}"] = arr

    gguf = _gguf()

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(os.fspath(tmp), arch_)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(adapter.resolve().name)
        w.add_string(_META_CONFIG, json.dumps(config))
        if info is not None:
            w.add_string(_META_INFO, info)
        w.add_bool(_META_FOLDED, folded)
        if permuted:
            for key, kv in ((_META_HEADS, False), (_META_KV_HEADS, True)):
                counts = [base_info.heads(i, kv) for i in _layers(written)]
                if len(set(counts)) == 1:
                    w.add_uint32(key, int(counts[0]))  # type: ignore[arg-type]
        for name in sorted(written, key=_tensor_order):
            w.add_tensor(name, written[name])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return _atomic_file(out, write, overwrite)


def _layers(written: Mapping[str, Any]) -> list[int]:
    qk = ("attn_q", "attn_k")
    return sorted({int(n.split(".")[1]) for n in written if n.split(".")[2] in qk})


def _tensor_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]), name) if parts[0] == "blk" else (-1, name)


# --------------------------------------------------------------------------- GGUF -> PEFT


def gguf_to_lora(
    gguf_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a llama.cpp LoRA GGUF as a PEFT LoRA adapter directory.

    A GGUF written by :func:`lora_to_gguf` comes back as the directory it was made from (the
    same config, the same tensors, ``rank1fast.json`` included). Any other llama.cpp LoRA GGUF
    (``convert_lora_to_gguf.py``'s) gets a config built from its tensors: ``r`` (with a
    ``rank_pattern`` when the ranks differ), ``lora_alpha``, the full module paths as
    ``target_modules``.

    Args:
        gguf_path: the LoRA ``.gguf``.
        out: the adapter directory to create.
        base: the base model (``.gguf`` or Hugging Face directory), for the head counts that
            undo llama.cpp's q/k row permutation in a GGUF rank1fast did not write.
        base_model: ``base_model_name_or_path`` for the config (default: the one recorded by
            :func:`lora_to_gguf`, else none).
        overwrite: replace ``out`` if it is an adapter directory (or empty).

    Returns:
        The adapter directory.

    Raises:
        AdapterError: not a llama.cpp LoRA adapter GGUF, a tensor without a Hugging Face module
            here (embeddings, norms, fused projections), a lone lora_a/lora_b, q/k tensors of a
            llama model without head counts, or ``out`` existing.
        PathNotFoundError: the file does not exist.

    Example:
        >>> rank1fast.llamacpp.gguf_to_lora("happy.gguf", "happy-lora")  # doctest: +SKIP
        PosixPath('happy-lora')
    """
    from ._fs import write_json
    from .adapter import check_destination, move_adapter

    path, out = Path(gguf_path), Path(out)
    if not path.is_file():
        raise PathNotFoundError(f"{path}: no such file")
    gguf = _gguf()
    try:
        _files.check_gguf(path)
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf-py's failure on a bad file, named
        raise AdapterError(f"{path}: not a readable GGUF file: {e}") from e
    if _field(reader, "general.type") != "adapter" or _field(reader, "adapter.type") != "lora":
        raise AdapterError(
            f"{path}: not a llama.cpp LoRA adapter (general.type "
            f"{_field(reader, 'general.type')!r}, adapter.type {_field(reader, 'adapter.type')!r})"
        )
    arch = _field(reader, "general.architecture")
    base_info = _load_base(base)
    if base_info.arch is not None and base_info.arch != arch:
        raise AdapterError(
            f"{path}: a LoRA for {arch!r}, but {base_info.source} is {base_info.arch!r}"
        )
    if arch not in ARCHITECTURES:
        raise AdapterError(
            f"{path}: architecture {arch!r}; only {', '.join(ARCHITECTURES)} map back to "
            "Hugging Face modules here"
        )
    alpha = float(_field(reader, gguf.Keys.Adapter.LORA_ALPHA) or 0.0)
    stored_config = _json_field(reader, _META_CONFIG, path)
    info = _field(reader, _META_INFO)
    folded = bool(_field(reader, _META_FOLDED))
    if _field(reader, _META_HEADS) is not None and base_info.n_head is None:
        base_info.n_head = int(_field(reader, _META_HEADS))
        base_info.n_head_kv = _field(reader, _META_KV_HEADS)

    pairs: dict[str, dict[str, np.ndarray]] = {}
    kinds = {}
    for t in reader.tensors:
        m = _GGUF_LORA.match(t.name)
        if not m:
            raise AdapterError(
                f"{path}: tensor {t.name!r} is not a lora_a/lora_b of a q/k/v/o or gate/up/down "
                "projection; it has no PEFT LoRA equivalent here"
            )
        data = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type))
        ne = [int(x) for x in t.shape]
        data = data.reshape(ne[::-1])
        kinds[t.name] = t.tensor_type.name
        name = f"blk.{int(m.group(1))}.{m.group(2)}.weight"
        pairs.setdefault(name, {})[m.group(3)] = data
    if not pairs:
        raise AdapterError(f"{path}: holds no LoRA tensors")

    half = all(k == "F16" for k in kinds.values())
    out_dtype = np.float16 if half else np.float32
    arrays: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    for name in sorted(pairs, key=_tensor_order):
        ab = pairs[name]
        if set(ab) != {"a", "b"}:
            raise AdapterError(f"{path}: {name} has lora_{''.join(ab)} only")
        a, b = ab["a"], ab["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{path}: {name}: lora_a {list(a.shape[::-1])} and lora_b {list(b.shape[::-1])} "
                "(GGUF order) are not [n_in, r] and [r, n_out]"
            )
        module = _hf_module(name)
        layer, stem = int(name.split(".")[1]), name.split(".")[2]
        if ARCHITECTURES[arch] and stem in ("attn_q", "attn_k"):
            heads = base_info.heads(layer, kv=stem == "attn_k")
            if heads is None:
                raise AdapterError(
                    f"{path}: {name}: llama.cpp stores the query/key rows of llama models "
                    "permuted; undoing it needs the base model's head counts: pass base="
                )
            b = _permute(b, heads, inverse=True)
        key = f"base_model.model.{module}"
        arrays[f"{key}.lora_A.weight"] = np.ascontiguousarray(a, dtype=out_dtype)
        arrays[f"{key}.lora_B.weight"] = np.ascontiguousarray(b, dtype=out_dtype)
        ranks[module] = int(a.shape[0])

    if stored_config is not None and not folded:
        config = dict(stored_config)
        if base_model is not None:
            config["base_model_name_or_path"] = base_model
    else:
        config = _built_config(ranks, alpha, base_model, stored_config)

    check_destination(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise Rank1IOError(f"{out}: cannot write: {e}") from e
    try:
        from safetensors.numpy import save_file

        write_json(tmp / CONFIG_FILE, config)
        if info is not None:
            with open(tmp / INFO_FILE, "w", encoding="utf-8") as f:
                f.write(info)
                f.flush()
                os.fsync(f.fileno())
        save_file(arrays, os.fspath(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        with open(tmp / WEIGHTS_FILE, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
        move_adapter(tmp, out, overwrite)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Rank1Error):
            raise
        raise Rank1IOError(f"{out}: cannot write: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _json_field(reader: Any, key: str, path: Path) -> dict[str, Any] | None:
    raw = _field(reader, key)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise AdapterError(f"{path}: {key} is not JSON: {e}") from e
    return doc if isinstance(doc, dict) else None


def _built_config(
    ranks: dict[str, int], alpha: float, base_model: str | None, stored: dict[str, Any] | None
) -> dict[str, Any]:
    r = max(ranks.values())
    base = base_model or (stored or {}).get("base_model_name_or_path")
    config = peft_config(list(ranks), r, base)
    config["lora_alpha"] = alpha if alpha else r
    config["rank_pattern"] = {m: k for m, k in ranks.items() if k != r}
    if not alpha:  # llama.cpp: scale 1 whatever the rank
        config["alpha_pattern"] = {m: k for m, k in ranks.items() if k != r}
    return config


# --------------------------------------------------------------------------- control vectors


def control_vector_to_gguf(
    vectors: Mapping[str, Any] | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    model_hint: str = "llama",
    overwrite: bool = False,
) -> Path:
    """Write steering vectors at ``resid_post`` sites as a llama.cpp control vector GGUF.

    ``resid_post.L`` becomes ``direction.L`` (float32, ``scale·v``), which llama.cpp adds to the
    output of decoder block ``L``: the same addition as hook steering at ``resid_post.L``.
    :func:`rank1fast.vectors.load` reads the file back to the same sites.

    Args:
        vectors: ``{site: vector}``, or a file :func:`rank1fast.vectors.load` reads. Sites:
            ``resid_post.L`` with ``L >= 1`` (or ``model.layers.L.mlp.down_proj``).
        out: the ``.gguf`` file to write.
        scale: multiplies every vector (llama.cpp's ``--control-vector-scaled`` multiplies
            again at load time).
        model_hint: ``controlvector.model_hint``, the Hugging Face ``model_type`` the vectors are
            for (repeng checks it; llama.cpp ignores it).
        overwrite: replace ``out`` if it exists.

    Returns:
        The file written.

    Raises:
        AdapterError: a site that is not ``resid_post.L`` with ``L >= 1`` (``resid_mid`` sites
            have no control-vector form: serve them as a LoRA), two vectors for one layer,
            vectors of different sizes, non-finite values, or ``out`` existing.

    Example:
        >>> vecs = {"resid_post.15": v}                                           # doctest: +SKIP
        >>> rank1fast.llamacpp.control_vector_to_gguf(vecs, "steer.gguf", scale=4)  # doctest: +SKIP
        PosixPath('steer.gguf')
    """
    out = Path(out)
    if not isinstance(vectors, Mapping):
        from .vectors import load

        vectors = load(vectors)
    if not vectors:
        raise AdapterError("no steering vectors given")
    scale = float(scale)
    if not np.isfinite(scale):
        raise AdapterError(f"scale must be finite; got {scale}")
    _check_file_out(out, overwrite)
    layers: dict[int, np.ndarray] = {}
    sources: dict[int, str] = {}
    for site, v in vectors.items():
        layer = control_vector_layer(str(site))
        arr = np.asarray(v, dtype=np.float64)
        if arr.ndim != 1 or arr.size == 0:
            raise AdapterError(f"site {site}: a steering vector is 1-D, got shape {arr.shape}")
        if layer in layers:
            raise AdapterError(
                f"sites {sources[layer]} and {site} are both direction.{layer}; sum them first"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            d = (scale * arr).astype(np.float32)
        if not np.isfinite(d).all():
            raise AdapterError(f"site {site}: the scaled vector is not finite in float32")
        layers[layer], sources[layer] = d, str(site)
    sizes = {v.size for v in layers.values()}
    if len(sizes) > 1:
        detail = ", ".join(f"{sources[k]}: {v.size}" for k, v in sorted(layers.items()))
        raise AdapterError(f"control vectors need one size (the model's hidden size); got {detail}")

    gguf = _gguf()

    def write(tmp: Path) -> None:
        arch = "controlvector"
        w = gguf.GGUFWriter(os.fspath(tmp), arch)
        w.add_string(f"{arch}.model_hint", str(model_hint))
        w.add_uint32(f"{arch}.layer_count", len(layers))
        for layer in sorted(layers):
            w.add_tensor(f"direction.{layer}", layers[layer])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return _atomic_file(out, write, overwrite)


# --------------------------------------------------------------------------- files


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_file_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise AdapterError(f"{out} is a directory; expected a .gguf file name")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise AdapterError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")


def _atomic_file(out: Path, write: Any, overwrite: bool) -> Path:
    """Run ``write(tmp)`` on a temporary file next to ``out``, fsync it and rename it to ``out``."""
    _check_file_out(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    except OSError as e:
        raise Rank1IOError(f"{out}: cannot write: {e}") from e
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a served file is not
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise Rank1IOError(f"{out}: cannot write: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dfd = os.open(out.parent, os.O_RDONLY)
    except OSError:
        return out
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
    return out


# --------------------------------------------------------------------------- CLI


def add_cli(sub: Any) -> None:
    """Register ``rank1fast gguf {lora,control-vector,import}``."""
    p = sub.add_parser(
        "gguf",
        help="convert adapters and steering vectors to and from llama.cpp GGUF files",
        description="llama.cpp interop: a PEFT LoRA adapter as a GGUF LoRA (llama-server "
        "--lora), resid_post steering vectors as a control vector (--control-vector), and a "
        "GGUF LoRA back into a PEFT adapter directory.",
    )
    gsub = p.add_subparsers(dest="gguf_command", metavar="ACTION", required=True)

    lo = gsub.add_parser("lora", help="a PEFT LoRA adapter directory as a llama.cpp LoRA GGUF")
    lo.add_argument("adapter", help="the PEFT adapter directory")
    lo.add_argument("out", help="the .gguf file to write")
    lo.add_argument(
        "--base",
        default=None,
        metavar="MODEL",
        help="the base model's .gguf (or HF directory): checks names and shapes; needed for "
        "q_proj/k_proj LoRAs (llama.cpp's row permutation)",
    )
    lo.add_argument("--arch", default=None, choices=list(ARCHITECTURES))
    lo.add_argument("--dtype", default="float32", choices=list(_DTYPES))
    lo.add_argument("--overwrite", action="store_true")
    lo.set_defaults(func=_run_lora)

    cv = gsub.add_parser(
        "control-vector", help="resid_post steering vectors as a llama.cpp control vector"
    )
    cv.add_argument("vectors", help=".safetensors, .npy, .pt or control-vector .gguf")
    cv.add_argument("out", help="the .gguf file to write")
    cv.add_argument(
        "--site",
        action="append",
        dest="sites",
        metavar="S",
        help="use only these sites of the vector file (repeatable)",
    )
    cv.add_argument("--scale", type=float, default=1.0)
    cv.add_argument(
        "--model-hint", default="llama", help="controlvector.model_hint (default: llama)"
    )
    cv.add_argument("--overwrite", action="store_true")
    cv.set_defaults(func=_run_control_vector)

    im = gsub.add_parser("import", help="a llama.cpp LoRA GGUF as a PEFT adapter directory")
    im.add_argument("out", help="the adapter directory to create")
    im.add_argument("gguf", help="the LoRA .gguf")
    im.add_argument(
        "--base", default=None, metavar="MODEL", help="the base model (.gguf or HF directory)"
    )
    im.add_argument("--base-model", default=None, help="base_model_name_or_path for the config")
    im.add_argument("--overwrite", action="store_true")
    im.set_defaults(func=_run_import)


def _run_lora(args: Any) -> int:
    out = lora_to_gguf(
        args.adapter,
        args.out,
        base=args.base,
        arch=args.arch,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    gguf = _gguf()
    reader = gguf.GGUFReader(out)
    names = [t.name for t in reader.tensors]
    print(
        f"wrote {out}: {len(names) // 2} LoRA pairs for {_field(reader, 'general.architecture')}, "
        f"alpha {_field(reader, 'adapter.lora.alpha'):g}"
    )
    print(f"serve it with: llama-server -m MODEL.gguf --lora {out}")
    return 0


def _run_control_vector(args: Any) -> int:
    from .vectors import load_sites

    vecs = load_sites(args.vectors, args.sites)
    out = control_vector_to_gguf(
        vecs, args.out, scale=args.scale, model_hint=args.model_hint, overwrite=args.overwrite
    )
    for site, v in vecs.items():
        print(f"{site} -> direction.{control_vector_layer(site)}  norm {np.linalg.norm(v):.4g}")
    print(f"wrote {out}; serve it with: llama-server -m MODEL.gguf --control-vector {out}")
    return 0


def _run_import(args: Any) -> int:
    out = gguf_to_lora(
        args.gguf, args.out, base=args.base, base_model=args.base_model, overwrite=args.overwrite
    )
    config = json.loads((out / CONFIG_FILE).read_text())
    print(
        f"wrote {out}: r = {config.get('r')}, lora_alpha = {config.get('lora_alpha')}, "
        f"{len(config.get('target_modules') or [])} modules"
    )
    return 0
