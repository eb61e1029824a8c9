"""The PEFT LoRA adapter format: the file names, the config rank1fast writes, reading an
adapter directory back, PEFT's scaling rule, and pairing ``lora_A``/``lora_B`` by module.

Shared by :mod:`rank1fast.serving` (file names), :mod:`rank1fast.adapter` (writing),
:mod:`rank1fast.llamacpp` (PEFT <-> GGUF) and :mod:`rank1fast.explain` (reading LoRAs back).
The layout is PEFT's (``peft/utils/save_and_load.py``: ``base_model.model.<module>.lora_A.weight``
``[r, d_in]`` and ``...lora_B.weight`` ``[d_out, r]``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import _files
from .errors import AdapterError, DumpError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: A PEFT LoRA tensor name: group 1 the module path, group 2 ``A`` or ``B``.
PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_(A|B)\.weight$")


def peft_config(
    modules: list[str], rank: int, base_model: str | None, task_type: str = "CAUSAL_LM"
) -> dict[str, Any]:
    """The ``adapter_config.json`` of a LoRA of rank ``rank`` on ``modules`` (scaling 1:
    ``lora_alpha = r``); ``task_type`` ``FEATURE_EXTRACTION`` for a model without an LM head."""
    # Only keys every PEFT release since 0.6 understands (older releases reject unknown ones).
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "revision": None,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }


def read_peft(adapter: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The config and every tensor (numpy) of a PEFT adapter directory: safetensors weights,
    else a checked ``adapter_model.bin`` loaded with ``torch.load(weights_only=True)``.

    Raises:
        AdapterError: no config, an unreadable config or weights, no weights file.
        DumpError: a malformed safetensors file or torch zip (from :mod:`rank1fast._files`).
    """
    config_path = adapter / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{adapter}: not a PEFT adapter directory (no {CONFIG_FILE})")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{config_path}: unreadable: {e}") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: not a JSON object")
    weights = adapter / WEIGHTS_FILE
    tensors: dict[str, np.ndarray] = {}
    try:
        if weights.is_file():
            header, _ = _files.safetensors_header(weights)
            tensors = {k: np.array(_files.tensor_array(weights, t)) for k, t in header.items()}
        elif (adapter / "adapter_model.bin").is_file():
            import torch

            if _files.kind(adapter / "adapter_model.bin") == _files.TORCH_ZIP:
                _files.check_torch_zip(adapter / "adapter_model.bin")
            sd = torch.load(adapter / "adapter_model.bin", map_location="cpu", weights_only=True)
            tensors = {k: v.detach().float().numpy() for k, v in sd.items()}
        else:
            raise AdapterError(f"{adapter}: no {WEIGHTS_FILE} (or adapter_model.bin)")
    except (OSError, ValueError, RuntimeError) as e:
        if isinstance(e, (AdapterError, DumpError)):
            raise
        raise AdapterError(f"{adapter}: unreadable adapter weights: {e}") from e
    return config, tensors


def _pattern(pattern: Any, module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that names ``module``'s suffix."""
    if not isinstance(pattern, Mapping):
        return default
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?(?:{key})$", module):
                return value
        except re.error:
            if module == key or module.endswith("." + str(key)):
                return value
    return default


def peft_scaling(config: Mapping[str, Any], module: str) -> float:
    """PEFT's multiplier of ``B A x`` for ``module``: ``lora_alpha / r`` (``/ sqrt(r)`` with
    ``use_rslora``), per module through ``rank_pattern`` / ``alpha_pattern`` (PEFT's
    ``LoraLayer.update_layer``; a config without them: r = 8, lora_alpha = r)."""
    r = float(_pattern(config.get("rank_pattern"), module, config.get("r", 8)))
    alpha = float(
        _pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", config.get("r", 8)))
    )
    return alpha / (np.sqrt(r) if config.get("use_rslora") else r)


def lora_pairs(
    tensors: Mapping[str, Any], where: Path, only: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{module: (lora_A [r, d_in], lora_B [d_out, r])}`` as float64, in the tensors' order.

    Args:
        tensors: an adapter's tensors by name (:func:`read_peft`).
        where: the adapter, named in errors.
        only: why another tensor is refused, e.g. ``"explain reads LoRAs of linear modules
            only"`` (put in parentheses after the tensor's name).

    Raises:
        AdapterError: a tensor that is not a ``lora_A``/``lora_B`` weight, no LoRA tensor, a
            module with one of the two, or factors whose shapes do not chain.
    """
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, t in tensors.items():
        m = PEFT_KEY.match(key)
        if not m:
            raise AdapterError(f"{where}: tensor {key!r} is not a lora_A/lora_B weight ({only})")
        pairs.setdefault(m.group(1), {})[m.group(2)] = np.asarray(t, dtype=np.float64)
    if not pairs:
        raise AdapterError(f"{where}: holds no LoRA tensors")
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: module {module} has lora_{''.join(ab)} only")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{where}: module {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                "are not [r, d_in] and [d_out, r]"
            )
        out[module] = (a, b)
    return out
