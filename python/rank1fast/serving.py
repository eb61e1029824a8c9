"""Serving profiles: what each LoRA server accepts, checked in one place.

A profile names a server and the rules it applies to a PEFT LoRA adapter. The same rules serve
two purposes:

- :func:`rank1fast.write_adapter` ``(..., target=PROFILE)`` pads the rank to one the server
  takes and refuses, before writing anything, an adapter the server would reject;
- :func:`check` (``rank1fast check ADAPTER --for PROFILE``) lists everything a server would
  reject in any PEFT adapter directory or archive, whoever wrote it.

The profiles and where their rules come from:

========== ==================================================================================
peft       PEFT itself (``PeftModel.from_pretrained``): a LoRA config, its weights, tensor shapes
           that agree with ``r``, every LoRA key where PEFT loads it
           (``base_model.model.<module>.lora_A.weight``, the prefix once, no adapter name, on a
           module ``target_modules`` and ``layers_to_transform`` select: PEFT drops other keys
           silently and the adapter does nothing there). Every profile applies these rules too.
vllm       vLLM multi-LoRA (``vllm/lora/peft_helper.py``, ``vllm/lora/models.py``): ``r`` at most
           ``--max-lora-rank``, which takes 1, 8, 16, 32, 64, 128, 256, 320 or 512 (default 16:
           a larger r is a warning, above 512 an error; writing pads r to one of these values);
           ``bias: none``, no ``modules_to_save``, no DoRA, LoRA only on q/k/v/o/gate/up/down
           projections, only LoRA tensors, ``r``, ``lora_alpha`` and ``target_modules`` in the
           config.
fireworks  Fireworks "upload your own LoRA": ``r`` between 4 and 64, ``target_modules`` a list of
           q/k/v/o/gate/up/down projections (or w1/w2/w3, ``block_sparse_moe.gate``).
cloudflare Workers AI LoRAs: ``r`` at most 8, every file under 100 MB, exactly
           ``adapter_config.json`` + ``adapter_model.safetensors``, and a ``model_type`` of
           ``llama``, ``mistral`` or ``gemma`` in the config. (Newer Cloudflare pages allow
           r <= 32 and 300 MB on some models; the profile keeps the limits every model takes.)
together   Together AI adapter upload: ``adapter_config.json`` and ``adapter_model.safetensors`` at
           the root of the directory or archive, nothing nested in a subdirectory.
========== ==================================================================================

A :class:`Problem` has a severity: ``"error"`` (the server refuses the adapter) or
``"warning"`` (it loads only with a non-default server setting, e.g. vLLM's
``--max-lora-rank``).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import _files as _tensor_files
from ._peft import CONFIG_FILE, WEIGHTS_FILE
from .errors import DumpError, InvalidArgumentError, PathNotFoundError

__all__ = [
    "Profile",
    "Problem",
    "PROFILES",
    "get_profile",
    "check",
    "check_files",
    "read_adapter_files",
    "AdapterFiles",
    "ERROR",
    "WARNING",
]

WEIGHTS_BIN = "adapter_model.bin"
#: Weight file names PEFT-style loaders look for, in order.
_WEIGHT_NAMES = (WEIGHTS_FILE, WEIGHTS_BIN, "adapter_model.pt")
ERROR = "error"
WARNING = "warning"
MB = 1_000_000
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# base_model.model.<module>.<factor>.weight|bias, as PeftModel.save_pretrained writes them.
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<param>weight|bias))?$"
)


@dataclass(frozen=True)
class Profile:
    """What one server accepts.

    Attributes:
        name: the profile's name (``--for NAME``).
        server: the server, in words (used in messages).
        url: where the rules are documented.
        min_rank, max_rank: the ranks the server loads (``max_rank=None``: no limit).
        ranks: when set, the ranks :func:`rank1fast.write_adapter` pads to (vLLM's
            ``--max-lora-rank`` values: an adapter of such a rank fills the server's buffers
            exactly).
        default_max_rank: ranks above this load only with a non-default server setting
            (reported as a warning).
        target_modules: module names LoRA may sit on (a module path matches when it is the name
            or ends with ``.name``); None: any.
        target_modules_list: ``target_modules`` must be a list (not a regex string).
        bias, modules_to_save, dora: whether the server takes LoRA biases / trained copies of
            whole modules / DoRA magnitudes.
        weights_files: the weight file names the server reads (the first is what rank1fast
            writes).
        max_file_bytes: every file must be smaller than this.
        flat: the files must sit at the root, nothing in subdirectories.
        model_types: the config must hold a ``model_type`` among these.
        required: config keys that must be present.
        lora_tensors_only: the weights may hold only LoRA factors (no other tensors).
    """

    name: str
    server: str
    url: str
    min_rank: int = 1
    max_rank: int | None = None
    ranks: tuple[int, ...] | None = None
    default_max_rank: int | None = None
    target_modules: tuple[str, ...] | None = None
    target_modules_list: bool = False
    bias: bool = True
    modules_to_save: bool = True
    dora: bool = True
    weights_files: tuple[str, ...] = (WEIGHTS_FILE, WEIGHTS_BIN)
    max_file_bytes: int | None = None
    flat: bool = False
    model_types: tuple[str, ...] | None = None
    required: tuple[str, ...] = ("r",)
    lora_tensors_only: bool = False

    def accepts_rank(self, rank: int) -> bool:
        """Whether the server loads an adapter of this rank (with some server setting)."""
        return rank >= self.min_rank and (self.max_rank is None or rank <= self.max_rank)

    def pad_rank(self, rank: int) -> int:
        """The rank to write for a requested ``rank``: the smallest one the server takes.

        Raises:
            InvalidArgumentError: no rank the server takes is at least ``rank``.

        Example:
            >>> get_profile("fireworks").pad_rank(1)
            4
            >>> get_profile("vllm").pad_rank(2)
            8
        """
        if self.ranks is not None:
            fits = [r for r in self.ranks if r >= rank and self.accepts_rank(r)]
        else:
            r = max(rank, self.min_rank)
            fits = [r] if self.accepts_rank(r) else []
        if not fits:
            raise InvalidArgumentError(
                f"rank {rank}: {self.server} takes {self.rank_text()}; no rank it accepts can "
                f"hold a rank-{rank} adapter"
            )
        return min(fits)

    def rank_text(self) -> str:
        """The accepted ranks, in words."""
        if self.ranks is not None:
            return "r in {" + ", ".join(map(str, self.ranks)) + "}"
        if self.max_rank is None:
            return f"r >= {self.min_rank}"
        if self.min_rank <= 1:
            return f"r <= {self.max_rank}"
        return f"{self.min_rank} <= r <= {self.max_rank}"


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="peft",
            server="PEFT",
            url="https://huggingface.co/docs/peft/package_reference/lora",
        ),
        Profile(
            name="vllm",
            server="vLLM",
            url="https://docs.vllm.ai/en/latest/features/lora.html",
            max_rank=512,
            ranks=(1, 8, 16, 32, 64, 128, 256, 320, 512),
            default_max_rank=16,
            target_modules=_PROJECTIONS,
            bias=False,
            modules_to_save=False,
            dora=False,
            weights_files=_WEIGHT_NAMES,
            required=("r", "lora_alpha", "target_modules"),
            lora_tensors_only=True,
        ),
        Profile(
            name="fireworks",
            server="Fireworks",
            url="https://fireworks.ai/docs/fine-tuning/fine-tuned-import",
            min_rank=4,
            max_rank=64,
            target_modules=(*_PROJECTIONS, "w1", "w2", "w3", "block_sparse_moe.gate"),
            target_modules_list=True,
            required=("r", "target_modules"),
        ),
        Profile(
            name="cloudflare",
            server="Cloudflare Workers AI",
            url="https://developers.cloudflare.com/workers-ai/fine-tunes/loras/",
            max_rank=8,
            weights_files=(WEIGHTS_FILE,),
            max_file_bytes=100 * MB,
            model_types=("llama", "mistral", "gemma"),
        ),
        Profile(
            name="together",
            server="Together AI",
            url="https://docs.together.ai/docs/adapter-upload",
            weights_files=(WEIGHTS_FILE,),
            flat=True,
        ),
    )
}


def get_profile(profile: str | Profile) -> Profile:
    """The :class:`Profile` of that name (a Profile is returned as is).

    Raises:
        InvalidArgumentError: an unknown name.

    Example:
        >>> get_profile("vllm").max_rank
        512
    """
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[str(profile).lower()]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown serving profile {profile!r}; choose one of {', '.join(PROFILES)}"
        ) from None


@dataclass(frozen=True)
class Problem:
    """Something a server would reject (``severity="error"``) or load only with a non-default
    setting (``"warning"``).

    Attributes:
        rule: which rule: ``files``, ``layout``, ``config``, ``weights``, ``shapes``, ``rank``,
            ``bias``, ``modules_to_save``, ``dora``, ``target_modules``, ``tensor_names``,
            ``file_size`` or ``model_type``.
        message: what is wrong and, where it helps, how to fix it.
        severity: ``"error"`` or ``"warning"``.
        file: the file concerned, relative to the adapter, when there is one.
    """

    rule: str
    message: str
    severity: str = ERROR
    file: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f" ({self.file})" if self.file else ""
        return f"{self.severity}: [{self.rule}] {self.message}{where}"


# --------------------------------------------------------------------------- what is checked


@dataclass
class AdapterFiles:
    """What the rules look at: the files of an adapter, its config and its tensor shapes.

    :func:`check` reads these from a directory or an archive; :func:`rank1fast.write_adapter`
    builds them from what it is about to write, so both apply the very same rules.

    Attributes:
        files: every regular file, by path relative to the adapter (POSIX), with its size.
        root: the folder (``""`` or ``"sub/"``) that holds ``adapter_config.json``.
        archive: the files were read from an archive.
        config: the parsed config, or None when missing or unreadable.
        tensors: tensor name -> (dtype name as torch writes it, shape), or None when not
            readable.
        weights: the weight file the tensors came from.
        problems: problems found while reading (garbled files).
    """

    files: dict[str, int]
    root: str = ""
    archive: bool = False
    config: dict[str, Any] | None = None
    tensors: dict[str, tuple[str, tuple[int, ...]]] | None = None
    weights: str | None = None
    problems: list[Problem] = field(default_factory=list)


def check(adapter: str | os.PathLike[str], profile: str | Profile = "peft") -> list[Problem]:
    """Everything ``profile``'s server would reject in a PEFT LoRA adapter.

    Works on any adapter, not only rank1fast's: it reads ``adapter_config.json`` and the
    safetensors header (names, dtypes, shapes; never the tensor data). A missing or garbled
    config or weight file is reported as a problem, not raised.

    Args:
        adapter: an adapter directory, or a ``.zip`` / ``.tar`` / ``.tar.gz`` / ``.tgz``
            archive of one (as uploaded to hosted servers).
        profile: ``"peft"``, ``"vllm"``, ``"fireworks"``, ``"cloudflare"``, ``"together"``
            (see :data:`PROFILES`) or a :class:`Profile`.

    Returns:
        The problems, errors and warnings (empty when the server takes the adapter as is).

    Raises:
        PathNotFoundError: ``adapter`` does not exist.
        InvalidArgumentError: an unknown profile.

    Example:
        >>> for p in check("happy-lora", "vllm"):                      # doctest: +SKIP
        ...     print(p)
        error: [rank] r = 1024: vLLM takes r in {1, 8, 16, ...}
    """
    prof = get_profile(profile)
    return check_files(read_adapter_files(adapter), prof)


def check_files(adapter: AdapterFiles, profile: str | Profile) -> list[Problem]:
    """Apply ``profile``'s rules to an :class:`AdapterFiles` (what :func:`check` does after
    reading the files; :func:`rank1fast.write_adapter` calls it before writing)."""
    prof = get_profile(profile)
    problems = list(adapter.problems)
    for rule in _RULES:
        problems.extend(rule(adapter, prof))
    return problems


# --------------------------------------------------------------------------- reading


class _Tree:
    """Files of a directory or an archive: relative POSIX path -> size, and their bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, int] = {}
        self._archive: zipfile.ZipFile | tarfile.TarFile | None = None
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                rel = Path(dirpath).relative_to(path)
                for name in sorted(filenames):
                    p = Path(dirpath) / name
                    try:
                        if p.is_file():
                            self.files[(rel / name).as_posix()] = p.stat().st_size
                    except OSError:
                        continue
        elif zipfile.is_zipfile(path):
            zf = zipfile.ZipFile(path)
            self._archive = zf
            for info in zf.infolist():
                if not info.is_dir():
                    self.files[_norm(info.filename)] = info.file_size
        else:
            tf = tarfile.open(path, "r:*")
            self._archive = tf
            for m in tf.getmembers():
                if m.isfile():
                    self.files[_norm(m.name)] = m.size

    def open(self, rel: str) -> Any:
        if isinstance(self._archive, zipfile.ZipFile):
            return self._archive.open(self._member(rel))
        if isinstance(self._archive, tarfile.TarFile):
            f = self._archive.extractfile(self._member(rel))
            if f is None:
                raise OSError(f"{rel}: not a regular file")
            return f
        return open(self.path / rel, "rb")

    def _member(self, rel: str) -> str:
        names = (
            self._archive.namelist()
            if isinstance(self._archive, zipfile.ZipFile)
            else self._archive.getnames()  # type: ignore[union-attr]
        )
        return next(n for n in names if _norm(n) == rel)

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()


def _norm(name: str) -> str:
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in (".", "/")]
    return "/".join(parts)


def read_adapter_files(adapter: str | os.PathLike[str]) -> AdapterFiles:
    """Read what :func:`check_files` needs from an adapter directory or archive."""
    path = Path(adapter)
    if not path.exists():
        raise PathNotFoundError(f"{path}: no such adapter directory or archive")
    try:
        tree = _Tree(path)
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as e:
        return AdapterFiles(
            files={},
            problems=[
                Problem(
                    "files",
                    f"{path} is neither an adapter directory nor a readable zip/tar archive ({e})",
                )
            ],
        )
    try:
        return _read(tree)
    finally:
        tree.close()


def _read(tree: _Tree) -> AdapterFiles:
    out = AdapterFiles(files=dict(tree.files), archive=tree._archive is not None)
    configs = sorted((f for f in tree.files if f.rsplit("/", 1)[-1] == CONFIG_FILE), key=len)
    if configs and "/" in configs[0]:
        out.root = configs[0].rsplit("/", 1)[0] + "/"
    config_path = out.root + CONFIG_FILE
    if config_path in tree.files:
        try:
            with tree.open(config_path) as f:
                doc = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            out.problems.append(
                Problem("config", f"{CONFIG_FILE} is not valid JSON: {e}", file=config_path)
            )
        else:
            if isinstance(doc, dict):
                out.config = doc
            else:
                out.problems.append(
                    Problem(
                        "config",
                        f"{CONFIG_FILE} holds a JSON {type(doc).__name__}, not an object",
                        file=config_path,
                    )
                )
    for name in _WEIGHT_NAMES:
        rel = out.root + name
        if rel in tree.files:
            out.weights = rel
            break
    if out.weights is not None:
        try:
            if out.weights.endswith(".safetensors"):
                with tree.open(out.weights) as f:
                    out.tensors = _safetensors_shapes(f, tree.files[out.weights], out.weights)
            elif tree._archive is None:
                out.tensors = _torch_shapes(tree.path / out.weights)
        except _Garbled as e:
            out.problems.append(Problem("weights", str(e), file=out.weights))
        except OSError as e:
            out.problems.append(Problem("weights", f"unreadable: {e}", file=out.weights))
    return out


class _Garbled(Exception):
    pass


def _safetensors_shapes(f: Any, size: int, name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor dtypes and shapes from a safetensors header, validated as the reference reader
    validates them (by the Rust reader, ``source::parse_safetensors``) against the file size."""
    try:
        tensors, _ = _tensor_files.safetensors_header_stream(f, size, name)
    except DumpError as e:
        raise _Garbled(str(e).removeprefix(f"{name}: ")) from None
    return {n: (t.dtype, t.shape) for n, t in tensors.items()}


def _torch_shapes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """Shapes from a pickled ``adapter_model.bin`` (only when torch is installed)."""
    try:
        import torch
    except ImportError:
        return None
    try:
        if _tensor_files.kind(path) == _tensor_files.TORCH_ZIP:
            _tensor_files.check_torch_zip(path)  # members inside the file before torch allocates
    except DumpError as e:
        raise _Garbled(str(e).removeprefix(f"{path} ").removeprefix(f"{path}: ")) from None
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a garbled file
        raise _Garbled(f"not a loadable torch state dict: {e}") from None
    if not isinstance(sd, Mapping):
        raise _Garbled("not a torch state dict")
    return {
        str(k): (str(v.dtype).removeprefix("torch."), tuple(v.shape))
        for k, v in sd.items()
        if hasattr(v, "shape")
    }


# --------------------------------------------------------------------------- rules

_Rule = Callable[[AdapterFiles, Profile], Iterator[Problem]]
_RULES: list[_Rule] = []


def _rule(fn: _Rule) -> _Rule:
    _RULES.append(fn)
    return fn


@_rule
def _files(ad: AdapterFiles, p: Profile) -> Iterator[Problem]:
    if ad.root:
        sub = ad.root.rstrip("/")
        fix = f"pack the archive from inside {sub}/" if ad.archive else f"point at {sub}/"
        yield Problem(
            "layout",
            f"the PEFT files sit in {sub}/, not at the root of the "
            f"{'archive' if ad.archive else 'directory'}; {fix}",
            file=ad.root + CONFIG_FILE,
        )
    if ad.root + CONFIG_FILE not in ad.files:
        yield Problem("files", f"no {CONFIG_FILE}")
    present = [n for n in _WEIGHT_NAMES if ad.root + n in ad.files]
    if not any(n in p.weights_files for n in present):
        if present:
            yield Problem(
                "files",
                f"{p.server} reads only {' or '.join(p.weights_files)}; this adapter has "
                f"{', '.join(present)} (convert it with safetensors.torch.save_file)",
                file=ad.root + present[0],
            )
        else:
            yield Problem("files", f"no weights file ({' or '.join(p.weights_files)})")


@_rule
def _layout(ad: AdapterFiles, p: Profile) -> Iterator[Problem]:
    if not p.flat:
        return
    nested = sorted({f.split("/", 1)[0] for f in ad.files if "/" in f})
    if nested and not ad.root:  # a nested root is reported by _files already
        yield Problem(
            "layout",
            f"{p.server} wants the PEFT files at the root with nothing nested; found "
            f"{', '.join(n + '/' for n in nested)}",
        )


@_rule
def _file_size(ad: AdapterFiles, p: Profile) -> Iterator[Problem]:
    if p.max_file_bytes is None:
        return
    for name, size in sorted(ad.files.items()):
        if size >= p.max_file_bytes:
            yield Problem(
                "file_size",
                f"{size / MB:.1f} MB; {p.server} takes files under {p.max_file_bytes / MB:.0f} MB",
                file=name,
            )


def _config(ad: AdapterFiles) -> dict[str, Any]:
    return ad.config if ad.config is not None else {}


@_rule
def _config_fields(ad: AdapterFiles, p: Profile) -> Iterator[Problem]:
    if ad.config is None:
        return
    c, where = ad.config, ad.root + CONFIG_FILE
    if str(c.get("peft_type", "")).upper() != "LORA":
        yield Problem("config", f"peft_type is {c.get('peft_type')!r}, not 'LORA'", file=where)
    for key in p.required:
        if key not in c or c[key] is None:
            yield Problem("config", f"{p.server} needs {key!r} in the config", file=where)
    if "r" in c and _rank_value(c["r"]) is None:
        yield Problem("config", f"r must be a positive integer, got {c['r']!r}", file=where)
    pattern = c.get("rank_pattern")
    if pattern not in (None, {}) and not (
        isinstance(pattern, dict) and all(_rank_value(v) for v in pattern.values())
    ):
        yield Problem(
            "config", f"rank_pattern must map module names to ranks, got {pattern!r}", file=where
        )


def _rank_value(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 1 else None


def _ranks(c: Mapping[str, Any]) -> dict[str, int]:
    """``{"r": r, "rank_pattern[key]": r_key, ...}`` for the valid ranks of a config."""
    out = {}
    if _rank_value(c.get("r")):
        out["r"] = c["r"]
    pattern = c.get("rank_pattern")
    if isinstance(pattern, dict):
        for k, v in pattern.items():
            if _rank_value(v):
                out[f"rank_pattern[{k!r}]"] = v
    return out


@_rule
def _rank(ad: AdapterFiles, p: Profile) -> Iterator[Problem]:
    where = ad.root + CONFIG_FILE
    for what, r in _ranks(_config(ad)).items():
        if not p.accepts_rank(r):
            fix = ""
            if r < p.min_rank:
                fix = f"; pad it with zeros to r = {p.pad_rank(r)} (as write --for {p.name} does)"
            yield Problem(
                "rank", f"{what} = {r}: {p.server} takes {p.rank_text()}{fix}", file=where
            )
        elif p.default_max_rank is not None and r > p.default_max_rank:
            need = min((x for x in p.ranks or (r,) if x >= r), default=r)
            yield Problem(
                "rank",
                f"{what} = {r} is above {p.server}'s default maximum rank "
                f"{p.default_max_rank}: serve with --max-lora-rank {need} or more",
                severity=WARNING,
                file=where,
            )


def _lora_tensors(ad: AdapterFiles) -> Iterator[tuple[str, re.Match[str]]]:
    for name in ad.tensors or {}:
        m = _LORA_KEY.match(name)
        if m:
            yield name, m


@_rule
def _bias(ad: AdapterFiles, p: Profile) -> Iterator[Problem]:
    if p.bias:
        return
    c, where = _config(ad), ad.root + CONFIG_FILE
    if c.get("bias", "none") not in ("none", None):
        yield Problem("bias", f"bias is {c['bias']!r}; {p.server} needs bias: 'none'", file=where)
    if c.get("lora_bias"):
        yield Problem("bias", f"lora_bias is set; {p.server} takes no LoRA biases", file=where)
    biases = [n for n, m in _lora_tensors(ad) if m["param"] == "bias"]
    if biases:
        yield Problem(
            "bias",
            f"{len(biases)} LoRA bias tensor(s), e.g. {biases[0]}; {p.server} takes none",
            file=ad.weights,
        )


@_rule
def _modules_to_save(ad: AdapterFiles, p: Profile) -> Iterator[Problem]:
    saved = _config(ad).get("modules_to_save")
    if not p.modules_to_save and saved:
        yield Problem(
            "modules_to_save",
            f"modules_to_save is {saved!r}; {p.server} takes only LoRA factors (no trained "
            "copies of whole modules)",
            file=ad.root + CONFIG_FILE,
        )


@_rule
def _dora(ad: AdapterFiles, p: Profile) -> Iterator[Problem]:
    if p.dora:
        return
    if _config(ad).get("use_dora"):
        yield Problem(
            "dora", f"use_dora is true; {p.server} does not take DoRA", file=ad.root + CONFIG_FILE
        )
    magnitudes = [n for n, m in _lora_tensors(ad) if m["factor"] == "lora_magnitude_vector"]
    if magnitudes:
        yield Problem(
            "dora",
            f"{len(magnitudes)} DoRA magnitude tensor(s), e.g. {magnitudes[0]}",
            file=ad.weights,
        )


def _module_allowed(module: str, names: Iterable[str]) -> bool:
    return any(module == n or module.endswith("." + n) for n in names)


@_rule
def _target_modules(ad: AdapterFiles, p: Profile) -> Iterator[Problem]:
    if p.target_modules is None:
        return
    allowed = p.target_modules
    names = ", ".join(allowed)
    targets = _config(ad).get("target_modules")
    where = ad.root + CONFIG_FILE
    if isinstance(targets, list):
        bad = [t for t in targets if not (isinstance(t, str) and _module_allowed(t, allowed))]
        if bad:
            yield Problem(
                "target_modules",
                f"target_modules {bad!r}: {p.server} takes LoRA only on {names}",
                file=where,
            )
    elif isinstance(targets, str) and p.target_modules_list:
        yield Problem(
            "target_modules",
            f"target_modules is a pattern ({targets!r}); {p.server} wants a list of module names",
            file=where,
        )
    modules = sorted({m["module"] for _, m in _lora_tensors(ad)})
    bad = [m for m in modules if not _module_allowed(m, allowed)]
    if bad:
        yield Problem(
            "target_modules",
            f"LoRA weights on {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}: "
            f"{p.server} takes LoRA only on {names}",
            file=ad.weights,
        )


@_rule
def _tensor_names(ad: AdapterFiles, p: Profile) -> Iterator[Problem]:
    if not p.lora_tensors_only or ad.tensors is None:
        return
    other = [n for n in ad.tensors if not _LORA_KEY.match(n)]
    if other:
        yield Problem(
            "tensor_names",
            f"{len(other)} tensor(s) that are not LoRA factors, e.g. {other[0]}; {p.server} "
            "loads only base_model.model.<module>.lora_A/lora_B.weight",
            file=ad.weights,
        )


_ANY_LORA = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.|$)"
)
_PEFT_PREFIX = "base_model.model."
#: The layer-index path segments PEFT's ``layers_to_transform`` looks for (peft
#: ``tuners_utils.COMMON_LAYERS_PATTERN``).
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|block|blocks|layer)\.(\d+)(?:\.|$)")


def _peft_key_problem(name: str, targets: Any, layers: Any) -> str | None:
    """Why ``PeftModel.from_pretrained`` would not load LoRA tensor ``name``, or None.

    PEFT (``set_peft_model_state_dict``) inserts the adapter name after the factor
    (``lora_A.weight`` -> ``lora_A.default.weight``) and loads the result with
    ``load_state_dict(strict=False)``: a key that names no adapter parameter of the wrapped
    model is dropped with at most a warning, and the adapter silently does nothing there.
    """
    if not name.startswith(_PEFT_PREFIX):
        return f"PEFT keys start with {_PEFT_PREFIX!r}"
    m = _LORA_KEY.match(name)
    if m is None:
        return (
            "not <module>.lora_A/lora_B.weight (an adapter name inside the key, as in "
            "lora_A.default.weight, is not what PEFT saves: it would look for "
            "lora_A.default.default.weight)"
        )
    module = m["module"]
    if module.startswith(("base_model.model.", "base_model.")):
        return f"the {_PEFT_PREFIX!r} prefix is doubled"
    if isinstance(targets, list) and not _module_allowed(module, [str(t) for t in targets]):
        return f"module {module} matches no target_modules entry {targets!r}"
    if isinstance(targets, str) and targets != "all-linear":
        try:
            if re.fullmatch(targets, module) is None:
                return f"module {module} does not match the target_modules pattern {targets!r}"
        except re.error:
            pass
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(layers, list) and layers:
        idx = _LAYER_INDEX.search(module)
        if idx is None or int(idx.group(1)) not in layers:
            return f"module {module} is outside layers_to_transform {layers!r}"
    return None


@_rule
def _peft_keys(ad: AdapterFiles, p: Profile) -> Iterator[Problem]:
    if ad.tensors is None:
        return
    c = _config(ad)
    targets, layers = c.get("target_modules"), c.get("layers_to_transform")
    lost = [
        (name, why)
        for name in ad.tensors
        if _ANY_LORA.search(name) and (why := _peft_key_problem(name, targets, layers))
    ]
    if lost:
        name, why = lost[0]
        more = f" ({len(lost)} such tensors)" if len(lost) > 1 else ""
        yield Problem(
            "tensor_keys",
            f"PEFT would not load {name}: {why}{more}; the adapter would silently do nothing there",
            file=ad.weights,
        )


@_rule
def _shapes(ad: AdapterFiles, p: Profile) -> Iterator[Problem]:
    if ad.tensors is None:
        return
    c = _config(ad)
    r = _rank_value(c.get("r"))
    pattern = (
        {k: v for k, v in (c.get("rank_pattern") or {}).items() if _rank_value(v)}
        if (isinstance(c.get("rank_pattern"), dict))
        else {}
    )
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, m in _lora_tensors(ad):
        if m["param"] in (None, "weight") and m["factor"] != "lora_magnitude_vector":
            kind = "A" if m["factor"].endswith("A") else "B"
            factors.setdefault(m["module"], {})[kind] = ad.tensors[name][1]
    if not factors:
        yield Problem(
            "shapes", "the weights hold no LoRA factors (lora_A / lora_B)", file=ad.weights
        )
        return
    bad = []
    for module, f in sorted(factors.items()):
        if "A" not in f or "B" not in f:
            bad.append(f"{module}: lora_{'B' if 'A' in f else 'A'} missing")
            continue
        a, b = f["A"], f["B"]
        if len(a) != 2 or len(b) != 2:
            bad.append(f"{module}: lora_A {list(a)} and lora_B {list(b)} must be 2-D")
            continue
        want = _pattern_rank(module, pattern, r)
        if a[0] != b[1]:
            bad.append(f"{module}: lora_A {list(a)} and lora_B {list(b)} disagree on the rank")
        elif want is not None and a[0] != want:
            bad.append(f"{module}: rank {a[0]} in the weights, r = {want} in the config")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        yield Problem(
            "shapes", "tensor shapes inconsistent: " + "; ".join(bad[:3]) + more, file=ad.weights
        )


def _pattern_rank(module: str, pattern: Mapping[str, int], r: int | None) -> int | None:
    # PEFT matches rank_pattern keys against the end of the module path (a regex).
    for key, value in pattern.items():
        try:
            if re.fullmatch(rf"(.*\.)?{key}", module):
                return value
        except re.error:
            if module == key or module.endswith("." + key):
                return value
    return r


@_rule
def _model_type(ad: AdapterFiles, p: Profile) -> Iterator[Problem]:
    if p.model_types is None or ad.config is None:
        return
    mt = ad.config.get("model_type")
    if mt not in p.model_types:
        yield Problem(
            "model_type",
            f"model_type is {mt!r}; {p.server} needs one of {', '.join(p.model_types)} in "
            f"{CONFIG_FILE}",
            file=ad.root + CONFIG_FILE,
        )


# --------------------------------------------------------------------------- CLI


def add_cli(sub: Any) -> None:
    """Register ``rank1fast check``."""
    p = sub.add_parser(
        "check",
        help="list what a LoRA server would reject in a PEFT adapter",
        description="Check a PEFT LoRA adapter directory (or a .zip/.tar.gz of one) against a "
        "server's rules: rank, bias, modules_to_save, DoRA, target modules, file names and "
        "sizes, layout, and tensor shapes against r. Exit status 1 when a server would reject "
        "it.",
    )
    p.add_argument("adapter", help="adapter directory or archive")
    p.add_argument(
        "--for",
        dest="profiles",
        action="append",
        metavar="PROFILE",
        choices=[*PROFILES, "all"],
        help=f"server profile ({', '.join(PROFILES)}, or all; repeatable; default peft)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run_check)


def _run_check(args: Any) -> int:
    names = args.profiles or ["peft"]
    if "all" in names:
        names = list(PROFILES)
    files = read_adapter_files(args.adapter)
    results = {name: check_files(files, name) for name in dict.fromkeys(names)}
    failed = any(p.severity == ERROR for probs in results.values() for p in probs)
    if args.json:
        doc = {
            "adapter": os.fspath(args.adapter),
            "ok": not failed,
            "profiles": {
                name: {
                    "ok": not any(p.severity == ERROR for p in probs),
                    "problems": [p.to_json() for p in probs],
                }
                for name, probs in results.items()
            },
        }
        print(json.dumps(doc, indent=2))
    else:
        for name, probs in results.items():
            errors = sum(p.severity == ERROR for p in probs)
            warnings = len(probs) - errors
            head = "OK" if not errors else f"{errors} problem{'s' * (errors != 1)}"
            if warnings:
                head += f", {warnings} warning{'s' * (warnings != 1)}"
            print(f"{args.adapter}: {name} ({PROFILES[name].server}): {head}")
            for prob in probs:
                where = f" [{prob.file}]" if prob.file else ""
                print(f"  {prob.severity:<7} {prob.rule:<15} {prob.message}{where}")
    return 1 if failed else 0
