"""Type stubs of the native module (rust/rank1fast-py). Kept true by `make lint` (stubtest)."""

import os
from collections.abc import Callable
from typing import Any, final

import numpy as np
import numpy.typing as npt

FOLD_BLOCK_ROWS: int

@final
class SiteStats:
    def __new__(
        cls,
        name: str,
        dtype: str,
        dim: int,
        folds: int,
        count: int,
        nonfinite: int,
        skipped: int,
        mean: npt.NDArray[np.float64],
        m2: npt.NDArray[np.float64],
        min: npt.NDArray[np.float64],
        max: npt.NDArray[np.float64],
        fold_count: npt.NDArray[np.uint64],
        fold_sum: npt.NDArray[np.float64],
        fold_sumsq: npt.NDArray[np.float64],
        fold_moment: npt.NDArray[np.float64] | None = None,
        skipped_sum: npt.NDArray[np.float64] | None = None,
    ) -> SiteStats: ...
    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def dim(self) -> int: ...
    @property
    def folds(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def nonfinite(self) -> int: ...
    @property
    def skipped(self) -> int: ...
    @property
    def has_moments(self) -> bool: ...
    def mean(self) -> npt.NDArray[np.float64]: ...
    def m2(self) -> npt.NDArray[np.float64]: ...
    def skipped_sum(self) -> npt.NDArray[np.float64]: ...
    def min(self) -> npt.NDArray[np.float64]: ...
    def max(self) -> npt.NDArray[np.float64]: ...
    def fold_count(self) -> npt.NDArray[np.uint64]: ...
    def fold_sum(self) -> npt.NDArray[np.float64]: ...
    def fold_sumsq(self) -> npt.NDArray[np.float64]: ...
    def fold_moment(self) -> npt.NDArray[np.float64] | None: ...
    def total_moment(self) -> npt.NDArray[np.float64] | None: ...
    def merge(self, other: SiteStats) -> SiteStats: ...
    def constant_direction(
        self,
        ridges: list[float] | None = None,
        solver: str = "auto",
        block: int | None = None,
        max_dim: int | None = None,
        tol: float | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]: ...
    def duplicated_dims(
        self, tol: float = 1e-6, keep: int = 3
    ) -> tuple[int, list[tuple[int, int]]]: ...
    def onehot(self) -> dict[str, Any]: ...

def analyze(
    path: str,
    sites: list[str] | None = None,
    skip_positions: int = 1,
    folds: int = 5,
    second_moments: bool = True,
    threads: int = 0,
    progress: Callable[[int, int], Any] | None = None,
    shifts: dict[str, npt.NDArray[np.float32]] | None = None,
    moment_rows: int | None = None,
    memory_limit: int | None = None,
) -> list[SiteStats]: ...
def second_moment_shifts(
    path: str,
    sites: list[str] | None = None,
    skip_positions: int = 1,
    second_moments: bool = True,
) -> list[tuple[str, npt.NDArray[np.float32]]]: ...
def default_ridges() -> list[float]: ...
def krylov_sketch(
    dim: int, block: int | None = None, seed: int | None = None
) -> tuple[dict[str, Any], npt.NDArray[np.float64]]: ...
def safetensors_header(
    path: str | os.PathLike[str], head: bytes | None = None, file_len: int | None = None
) -> tuple[list[tuple[str, str, list[int], int, int]], dict[str, str]]: ...
def file_kind(path: str | os.PathLike[str]) -> str | None: ...
def gram_kernels() -> tuple[list[str], str, str]:
    """(kernels this CPU can run, the one used for bf16 dumps, the one for f16/f32 dumps)."""

# --- adapter writer (rust/rank1fast-core/src/adapter.rs) ---
def write_lora(
    path: str,
    modules: list[str],
    directions: list[npt.NDArray[np.float64]],
    vectors: list[npt.NDArray[np.float64]],
    scale: float = 1.0,
    rank: int = 1,
    dtype: str = "float32",
    metadata: dict[str, str] | None = None,
    extra: list[list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]] | None = None,
) -> int: ...

# --- merge (rust/rank1fast-core/src/merge.rs) ---
def merge(
    model_dir: str,
    adapter: str,
    out_dir: str,
    overwrite: bool = False,
    progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]: ...
