"""The direction's solvers: Krylov against exact (synthetic and the default model's activations),
the torch solve against the core, and memory refusal before allocating."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rank1fast
from rank1fast import InsufficientMemoryError, InvalidArgumentError
from synth import write_dump

# A small Krylov budget (at most 64 dimensions) so that the subspace is far smaller than dim.
SMALL = {"block": 8, "max_dim": 64}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> rank1fast.Report:
    root = tmp_path_factory.mktemp("solve") / "dump"
    write_dump(root, {"h": 384}, docs=[400] * 10, dtype="bfloat16", massive_cv=0.1)
    return rank1fast.analyze(root, progress=False)


def held_out_rms(report: rank1fast.Report, fresh: rank1fast.Report, site: str, b) -> float:
    """rms(b·x − 1) on other rows, from their second moments (E[(b·x−1)²] in closed form)."""
    s = fresh[site]
    g, m = s.second_moment, s.moment_mean
    return float(np.sqrt(max(b @ g @ b - 2 * b @ m + 1, 0.0)))


def test_krylov_within_2_percent_of_exact_on_synthetic(synthetic):
    s = synthetic["h"]
    exact = s.solve_direction(solver="exact")
    fit = s._stats.constant_direction(solver="krylov", **SMALL)
    assert exact.method == "exact" and exact.subspace == 384
    assert fit["method"] == "krylov" and fit["subspace"] <= 64
    # Held-out (cross-validated) error of the procedure, and the subspace cannot beat the whole
    # space by more than noise.
    assert 0.995 * exact.error <= fit["error"] <= 1.02 * exact.error
    # Auto: exact at this width; the solver choice travels from analyze to the report.
    assert s.direction.method == "exact"
    assert s.summary()["direction"]["method"] == "exact"


def test_solver_option_and_bad_names(synthetic, tmp_path: Path):
    with pytest.raises(InvalidArgumentError, match="solver"):
        synthetic["h"].solve_direction(solver="cholesky")
    root = tmp_path / "d"
    write_dump(root, {"h": 64}, docs=[200] * 6)
    with pytest.raises(InvalidArgumentError, match="solver"):
        rank1fast.analyze(root, solver="fast", progress=False)
    r = rank1fast.analyze(root, solver="krylov", progress=False)
    d = r["h"].direction
    assert d.method == "krylov" and 0 < d.subspace <= 64 and d.steps >= 1


def test_refused_before_allocating_with_the_folds_that_fit(tmp_path: Path):
    root = tmp_path / "d"
    write_dump(root, {"h": 512}, docs=[50] * 4)
    one = 512 * 512 * 8
    # Buffers: a 8192-row f32 chunk and 16 MiB of packing per thread.
    base = 8192 * 512 * 4 + (16 << 20)
    with pytest.raises(InsufficientMemoryError, match=r"folds=2 .*second_moments=False") as e:
        rank1fast.analyze(root, threads=1, memory_limit=base + 2 * one + 1000, progress=False)
    assert isinstance(e.value, MemoryError)
    r = rank1fast.analyze(
        root, threads=1, folds=2, memory_limit=base + 2 * one + 1000, progress=False
    )
    assert r["h"].folds == 2


def test_torch_solve_matches_the_core(synthetic):
    pytest.importorskip("torch")
    from rank1fast.solve_torch import constant_direction

    s = synthetic["h"]
    core = s._stats.constant_direction(solver="krylov")
    fit = constant_direction(s.stats, device="cpu")
    assert (fit["subspace"], fit["steps"], fit["ridge"]) == (
        core["subspace"],
        core["steps"],
        core["ridge"],
    )
    np.testing.assert_allclose(fit["cv_errors"], core["cv_errors"], rtol=1e-6)
    scale = np.linalg.norm(core["vector"])
    np.testing.assert_allclose(fit["vector"], core["vector"], atol=1e-6 * scale)
    via_report = s.solve_direction(device="cpu")
    assert via_report.method == "krylov" and via_report.ridge == core["ridge"]


# --------------------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def real(smollm, prose, tmp_path_factory):
    """Activations of the default model at o_proj (576) and down_proj (1536) of layer 15, in
    two halves: one to fit, one to score on (fresh documents)."""
    root = tmp_path_factory.mktemp("real")
    kw = dict(max_length=128, batch_size=8, progress=False)
    sites = "resid_mid.15,resid_post.15"
    fit = rank1fast.collect(smollm, prose[:24], sites, root / "fit", **kw)
    fresh = rank1fast.collect(smollm, prose[24:36], sites, root / "fresh", **kw)
    return rank1fast.analyze(fit.path, progress=False), rank1fast.analyze(
        fresh.path, progress=False
    )


@pytest.mark.slow
@pytest.mark.parametrize("site", ["resid_mid.15", "resid_post.15"])
def test_krylov_within_2_percent_of_exact_on_the_default_model(real, site):
    report, fresh = real
    s = report[site]
    exact = s.solve_direction(solver="exact")
    # At most two thirds of the width, so that the subspace is a real restriction (at half the
    # width, o_proj's held-out error on these 2.5k tokens is 3 % above exact).
    cap = 2 * s.dim // 3
    krylov = s.stats.constant_direction(solver="krylov", max_dim=cap)
    assert krylov["method"] == "krylov" and krylov["subspace"] <= cap
    # The price: held-out (cross-validated) error at most 2 % above exact. A subspace also
    # regularises, so it may come out below; far below would mean a leak.
    assert 0.9 * exact.error <= krylov["error"] <= 1.02 * exact.error
    # On fresh documents as well.
    e_exact = held_out_rms(report, fresh, site, exact.vector)
    e_krylov = held_out_rms(report, fresh, site, krylov["vector"])
    assert 0.9 * e_exact <= e_krylov <= 1.02 * e_exact
