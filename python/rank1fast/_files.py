"""Reading the tensor files users bring: safetensors, ``.npy``, and what a file is by content.

Shared by :mod:`rank1fast.vectors` (steering vectors, SAE weights), :mod:`rank1fast.serving`
(adapter headers) and :mod:`rank1fast.llamacpp` (adapter weights, GGUF headers). Safetensors
headers are validated by the Rust reader (``rust/rank1fast-core/src/source.rs``, the rules of
huggingface/safetensors' own reader), so every file is judged by one piece of code; ``.npy``
files are read by numpy's own format module with the lengths of their header checked against
the file before any allocation; torch zips and GGUF headers are walked with every length
checked before torch or gguf-py trusts it. Every problem is a
:class:`~rank1fast.errors.DumpError` naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import ast
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import _core
from .errors import DumpError

#: How :func:`kind` names each format.
SAFETENSORS = "a safetensors file"
NPY = "a .npy file"
GGUF = "a GGUF file"
TORCH_ZIP = "a zip archive (torch.save writes these)"
TORCH_PICKLE = "a pickle (torch.save's legacy format)"

#: What a file extension promises.
EXPECTED = {
    ".safetensors": (SAFETENSORS,),
    ".npy": (NPY,),
    ".gguf": (GGUF,),
    ".pt": (TORCH_ZIP, TORCH_PICKLE),
    ".pth": (TORCH_ZIP, TORCH_PICKLE),
    ".bin": (TORCH_ZIP, TORCH_PICKLE),
}

#: numpy dtypes of the safetensors dtypes this package reads as numbers (bfloat16: see
#: :func:`_bf16_to_f32`).
_NUMPY = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<u2",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
}

#: Largest ``.npy`` header read (numpy's own default limit is 10,000 bytes for untrusted files).
_NPY_MAX_HEADER = 1 << 20


def kind(path: str | os.PathLike[str]) -> str | None:
    """What a file is from its first bytes (one of the constants above), or None."""
    return _core.file_kind(os.fspath(path))


def check_kind(path: Path) -> None:
    """Raise DumpError when ``path``'s content is another known format than its extension says.

    Raises:
        DumpError: e.g. ``x.safetensors: is a zip archive (torch.save writes these), not a
            safetensors file as its name says``.
    """
    want = EXPECTED.get(path.suffix.lower())
    if want is None:
        return
    found = kind(path)
    if found is not None and found not in want:
        raise DumpError(f"{path}: is {found}, not {want[0]} as its name says")


@dataclass(frozen=True)
class Tensor:
    """One tensor of a safetensors file: its dtype (torch-style name), shape, and where its
    bytes are (absolute offset in the file, length)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def safetensors_header(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors (in file order) and ``__metadata__`` of a safetensors file, validated.

    Raises:
        PathNotFoundError: no such file.
        DumpError: anything the format forbids (see ``source::parse_safetensors``), or a file
            that is another format.
    """
    check_kind(path)
    tensors, meta = _core.safetensors_header(os.fspath(path))
    return {n: Tensor(n, d, tuple(s), o, b) for n, d, s, o, b in tensors}, meta


def safetensors_header_stream(
    f: BinaryIO, size: int, name: str
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """:func:`safetensors_header` for an open stream of ``size`` bytes (an archive member);
    ``name`` names it in errors. Reads at most the header, never more than the file holds."""
    head = f.read(8)
    if len(head) == 8:
        n = int.from_bytes(head, "little")
        if n <= min(size - 8, 100_000_000):
            head += f.read(n)
    tensors, meta = _core.safetensors_header(name, head, size)
    return {n: Tensor(n, d, tuple(s), o, b) for n, d, s, o, b in tensors}, meta


def tensor_array(path: Path, t: Tensor, index: Any = None) -> np.ndarray:
    """The values of ``t`` (read-only, memory-mapped): float dtypes as stored, bfloat16 as
    float32, integers as stored. ``index`` (a numpy index) selects before anything is
    converted, so one decoder row of a large bfloat16 matrix reads only that row.

    Raises:
        DumpError: a dtype numpy cannot hold (float8, float4, complex, ...), named.
    """
    np_dtype = _NUMPY.get(t.dtype)
    if np_dtype is None:
        raise DumpError(
            f"{path} [{t.name}]: dtype {t.dtype} is not read here (float64, float32, float16 "
            "or bfloat16 tensors are)"
        )
    if t.nbytes == 0:
        arr = np.zeros(t.shape, np_dtype)
    else:
        arr = np.memmap(path, dtype=np_dtype, mode="r", offset=t.offset, shape=t.shape)
    if index is not None:
        arr = arr[index]
    return _bf16_to_f32(arr) if t.dtype == "bfloat16" else arr


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: a bfloat16 is the top half of a float32."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def check_torch_zip(path: Path) -> None:
    """Check a ``torch.save`` zip before ``torch.load`` reads it: torch writes its members
    uncompressed, so every member must lie inside the file; a member that claims more bytes
    would make the loader allocate what the header says.

    Raises:
        DumpError: not a zip archive, a compressed member, or a member beyond the file.
    """
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as e:
        raise DumpError(f"{path}: not a readable torch.save zip archive: {e}") from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise DumpError(
                f"{path} [{info.filename}]: a compressed member; torch.save stores members "
                "uncompressed"
            )
        if info.header_offset + info.file_size > size:
            raise DumpError(
                f"{path} [{info.filename}]: {info.file_size} bytes at offset "
                f"{info.header_offset} lie beyond the file ({size} bytes)"
            )


def npy_header(f: BinaryIO, size: int, name: str) -> tuple[str, bool, tuple[int, ...], int]:
    """``(descr, fortran_order, shape, data offset)`` of the ``.npy`` stream ``f`` of ``size``
    bytes (numpy's format versions 1-3), its header length checked against ``size`` before it
    is read; ``name`` names the file in errors.

    Raises:
        DumpError: not a ``.npy`` file, a garbled header, a structured dtype.
    """
    try:
        version = np.lib.format.read_magic(f)
    except ValueError as e:
        raise DumpError(f"{name}: not a valid .npy file: {e}") from None
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise DumpError(f"{name}: unsupported .npy format version {version}")
    hlen_size = 2 if version == (1, 0) else 4
    hlen = int.from_bytes(f.read(hlen_size), "little")
    if hlen > min(_NPY_MAX_HEADER, size - 8 - hlen_size):
        raise DumpError(
            f"{name}: header length {hlen} is beyond the file ({size} bytes) or the "
            f"{_NPY_MAX_HEADER} byte limit"
        )
    try:
        text = f.read(hlen).decode("utf-8" if version == (3, 0) else "latin1")
    except UnicodeDecodeError as e:
        raise DumpError(f"{name}: not a valid .npy file: {e}") from None
    try:
        header = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        header = None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise DumpError(f"{name}: garbled .npy header {text.strip()[:200]!r}")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str):
        raise DumpError(
            f"{name}: structured dtype {descr!r} (a record array): expected a plain float array"
        )
    if not (
        isinstance(shape, tuple) and all(isinstance(s, int) and s >= 0 for s in shape)
    ) or not isinstance(fortran, bool):
        raise DumpError(f"{name}: garbled .npy header {text.strip()[:200]!r}")
    return descr, fortran, shape, 8 + hlen_size + hlen


#: Sizes of GGUF's fixed-size value types (ggml ``gguf_type``): uint8 .. float64; 8 is a
#: string, 9 an array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def check_gguf(path: Path) -> None:
    """Walk a GGUF file's header (key-value pairs and tensor infos) with every count and length
    checked against the bytes left, before gguf-py's reader, which trusts them (an array count
    of 2^60 in a 300-byte file makes it loop and allocate without end).

    Raises:
        DumpError: not a GGUF file, an unknown value type, or a count or length beyond the file.
    """
    import mmap

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise DumpError(f"{path}: {size} bytes, too short for a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _walk_gguf(buf, size, path)


def _walk_gguf(buf: Any, size: int, path: Path) -> None:
    pos = 0

    def take(n: int, what: str) -> int:
        nonlocal pos
        if n < 0 or n > size - pos:
            raise DumpError(
                f"{path}: {what} needs {n} bytes at offset {pos}, the file has {size - pos} left"
            )
        start, pos = pos, pos + n
        return start

    def u32() -> int:
        return int.from_bytes(buf[take(4, "a uint32") : pos], "little")

    def u64(what: str = "a uint64") -> int:
        return int.from_bytes(buf[take(8, what) : pos], "little")

    def string(what: str) -> None:
        take(u64(what), what)

    def value(kind: int, key: str, depth: int = 0) -> None:
        if kind in _GGUF_SIZES:
            take(_GGUF_SIZES[kind], f"the value of {key}")
        elif kind == 8:
            string(f"the string value of {key}")
        elif kind == 9 and depth < 4:
            item, count = u32(), u64(f"the array length of {key}")
            if item in _GGUF_SIZES:
                take(count * _GGUF_SIZES[item], f"the {count}-item array {key}")
                return
            if count > (size - pos) // 8:  # every string or array item takes >= 8 bytes
                raise DumpError(
                    f"{path}: array {key} claims {count} items, more than the file could hold"
                )
            for _ in range(count):
                value(item, key, depth + 1)
        else:
            raise DumpError(f"{path}: key {key}: unknown GGUF value type {kind}")

    if bytes(buf[take(4, "the magic") : pos]) != b"GGUF":
        raise DumpError(f"{path}: not a GGUF file (bad magic)")
    version = u32()
    if version not in (2, 3):
        raise DumpError(f"{path}: GGUF version {version}, expected 2 or 3")
    n_tensors, n_kv = u64(), u64()
    if n_kv > (size - pos) // 13 or n_tensors > (size - pos) // 24:
        raise DumpError(
            f"{path}: the header claims {n_tensors} tensors and {n_kv} key-value pairs, more "
            f"than {size} bytes can hold"
        )
    for i in range(n_kv):
        start = take(0, "")
        string(f"key {i}")
        key = bytes(buf[start + 8 : pos]).decode("utf-8", "replace")
        value(u32(), key)
    for i in range(n_tensors):
        string(f"the name of tensor {i}")
        n_dims = u32()
        if n_dims > 8:
            raise DumpError(f"{path}: tensor {i} has {n_dims} dimensions")
        take(8 * n_dims + 4 + 8, f"the info of tensor {i}")


def load_npy(path: Path, dtype: str | None = None) -> np.ndarray:
    """A ``.npy`` array (format versions 1-3; C or Fortran order; little- or big-endian),
    memory-mapped, as a numeric array.

    Args:
        path: the file.
        dtype: ``"bfloat16"`` reads a 2-byte raw (``'<V2'``) array, as numpy records arrays of
            ``ml_dtypes.bfloat16``, as bfloat16; None keeps the file's dtype.

    Raises:
        DumpError: not a ``.npy`` file, a header that is garbled or claims more data than the
            file holds, object/structured/raw arrays (a raw 2-byte array without
            ``dtype="bfloat16"``), or pickled data.
    """
    check_kind(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        descr, fortran, shape, data_start = npy_header(f, size, str(path))
    try:
        file_dtype = np.dtype(descr)
    except (TypeError, ValueError) as e:
        raise DumpError(f"{path}: unknown dtype {descr!r} in the header: {e}") from None
    bf16 = False
    if file_dtype.kind == "V" and file_dtype.itemsize == 2 and not file_dtype.fields:
        if dtype != "bfloat16":
            raise DumpError(
                f"{path}: 2-byte raw dtype {descr!r} (how numpy stores ml_dtypes.bfloat16): "
                "pass dtype='bfloat16' to read it as bfloat16"
            )
        file_dtype, bf16 = np.dtype("<u2" if descr.startswith("<") else ">u2"), True
    elif dtype is not None:
        raise DumpError(f"{path}: dtype={dtype!r} applies only to raw 2-byte ('<V2') arrays")
    if file_dtype.hasobject:
        raise DumpError(f"{path}: holds Python objects (pickled data is never loaded)")
    if file_dtype.kind not in "fiub":
        raise DumpError(f"{path}: dtype {descr!r} is not numeric")
    count = 1
    for s in shape:
        count *= s
    if count * file_dtype.itemsize > size - data_start:
        raise DumpError(
            f"{path}: truncated: shape {list(shape)} of {descr} needs "
            f"{count * file_dtype.itemsize} data bytes, the file holds {size - data_start}"
        )
    if count == 0:
        arr: np.ndarray = np.zeros(shape, file_dtype)
    else:
        order = "F" if fortran else "C"
        arr = np.memmap(
            path, dtype=file_dtype, mode="r", offset=data_start, shape=shape, order=order
        )
    return _bf16_to_f32(arr) if bf16 else arr
