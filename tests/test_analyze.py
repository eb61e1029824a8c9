"""rank1fast.analyze against numpy float64 references on synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rank1fast
from rank1fast import _core
from synth import DTYPES, activations, encode, write_dump, write_safetensors

K = 5
BLOCK = _core.FOLD_BLOCK_ROWS


def check_stats(s: rank1fast.SiteReport, x: np.ndarray) -> None:
    """Every per-dimension statistic against numpy float64 on the kept rows ``x``."""
    assert s.count == len(x)
    assert s.dim == x.shape[1]
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.var, x.var(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s.std, x.std(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(s.min, x.min(0))
    np.testing.assert_array_equal(s.max, x.max(0))
    np.testing.assert_array_equal(s.absmax, np.abs(x).max(0))


def assert_moments_close(a: np.ndarray, b: np.ndarray, var: np.ndarray, raw: np.ndarray) -> None:
    """Second moments equal to f32 accuracy of the centred part (relative to sqrt(var_i var_j))
    plus f64 rounding of the raw moments ``raw``."""
    bound = 1e-4 * np.sqrt(np.outer(var, var)) + 1e-13 * np.abs(raw)
    worst = np.unravel_index(np.argmax(np.abs(a - b) / bound), a.shape)
    assert np.abs(a[worst] - b[worst]) <= bound[worst], (worst, a[worst], b[worst])


def check_second_moment(s: rank1fast.SiteReport, x: np.ndarray) -> None:
    """E[x xᵀ] to f32-accumulation accuracy *of the covariance*: the massive column (1e4) must
    not drown the variations that the constant direction depends on. (Raw f64 moments carry
    |E[x xᵀ]|·1e-16 of rounding on top, which only the 1e-2-noise column notices.)"""
    g = x.T @ x / len(x)
    cov = s.second_moment - np.outer(s.mean, s.mean)
    ref = np.cov(x, rowvar=False, bias=True)
    assert_moments_close(cov, ref, np.diag(ref), g)
    assert_moments_close(s.second_moment, g, np.diag(ref), g)


def assert_same_direction(b: np.ndarray, ref: np.ndarray, x: np.ndarray, error: float) -> None:
    """Two constant directions agree where it matters: their predictions b·x on the data differ
    by far less than the error of either (components span 1e-8..1e-1, so compare effects)."""
    gap = np.sqrt(np.mean((x @ (b - ref)) ** 2))
    assert gap <= 1e-2 * error + 1e-9, (gap, error)


def cv_reference(x: np.ndarray, fold: np.ndarray, ridges: np.ndarray) -> np.ndarray:
    """Brute-force K-fold ridge CV: solve on the training rows, score on the held-out rows."""
    d = x.shape[1]
    sq = np.zeros(len(ridges))
    held = 0
    for k in range(K):
        te = fold == k
        if te.all() or not te.any():
            continue
        xtr = x[~te]
        g = xtr.T @ xtr / len(xtr)
        mu = xtr.mean(0)
        t = np.trace(g) / d
        for i, lam in enumerate(ridges):
            b = np.linalg.solve(g + lam * t * np.eye(d), mu)
            sq[i] += ((x[te] @ b - 1.0) ** 2).sum()
        held += te.sum()
    return np.sqrt(sq / held)


def onehot_reference(x: np.ndarray, fold: np.ndarray) -> tuple[int, float]:
    d = x.shape[1]
    err = np.zeros(d)
    held = 0
    for k in range(K):
        te = fold == k
        if te.all() or not te.any():
            continue
        m = x[~te].mean(0)
        err += (((x[te] / m) - 1.0) ** 2).sum(0)
        held += te.sum()
    err = np.sqrt(err / held)
    j = int(np.argmin(err))
    return j, float(err[j])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["2d", "3d"])
def test_statistics_match_numpy(tmp_path: Path, dtype: str, layout: str) -> None:
    x = activations(3000, 48, seed=1)
    data, stored = encode(x, dtype)
    shape = (3000, 48) if layout == "2d" else (30, 100, 48)
    write_safetensors(tmp_path / "acts.safetensors", {"h": (dtype, shape, data)})
    report = rank1fast.analyze(tmp_path / "acts.safetensors", skip_positions=3, progress=False)
    assert report.sites == ["h"]
    s = report["h"]
    assert s.dtype == dtype
    if layout == "3d":
        keep = (np.arange(3000) % 100) >= 3  # position = seq index
        assert s.skipped == 30 * 3
    else:
        keep = np.ones(3000, bool)  # bare 2-D rows have no position
        assert s.skipped == 0
    check_stats(s, stored[keep])
    check_second_moment(s, stored[keep])


def test_massive_column_keeps_its_variance(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = (1e4 + 1e-2 * rng.normal(size=(200_000, 2))).astype(np.float32)
    np.save(tmp_path / "big.npy", x)
    s = rank1fast.analyze(tmp_path / "big.npy", progress=False)["big"]
    ref = x.astype(np.float64)
    np.testing.assert_allclose(s.var, ref.var(0), rtol=1e-6)
    np.testing.assert_allclose(s.mean, ref.mean(0), rtol=1e-14)


def test_npy_float16_and_outliers(tmp_path: Path) -> None:
    x = activations(2000, 32, seed=4).astype(np.float16)
    np.save(tmp_path / "site_a.npy", x)
    s = rank1fast.analyze(tmp_path / "site_a.npy", progress=False)["site_a"]
    ref = x.astype(np.float64)
    check_stats(s, ref)
    dims = [o.dim for o in s.outliers]
    assert dims[:3] == [1, 5, 9]  # by |mean|, largest first
    o = s.outliers[1]
    assert o.mean == pytest.approx(ref[:, 5].mean())
    assert o.cv == pytest.approx(ref[:, 5].std() / abs(ref[:, 5].mean()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_rows_are_counted_and_excluded(tmp_path: Path, dtype: str) -> None:
    # Rows straight from the map (f32, bf16) and decoded rows (f16): the statistics pass finds
    # the non-finite ones and drops them from the statistics and second moments alike.
    x = activations(3000, 16, seed=5)
    x[7, 3] = np.nan
    x[100, 0] = np.inf
    x[500, 15] = -np.inf
    x[2999, 2] = np.nan
    x[1200:1203, 5] = np.nan  # a few in one run
    data, x = encode(x, dtype)
    write_safetensors(tmp_path / "a.safetensors", {"a": (dtype, x.shape, data)})
    s = rank1fast.analyze(tmp_path / "a.safetensors", progress=False)["a"]
    assert s.nonfinite == 7
    keep = np.isfinite(x).all(1)
    check_stats(s, x[keep].astype(np.float64))
    check_second_moment(s, x[keep].astype(np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dump_directory_matches_concatenation_and_merge(tmp_path: Path, dtype: str) -> None:
    docs = [37, 120, 5, 64, 200, 90, 1, 77, 150, 33, 48]
    truth = write_dump(tmp_path / "dump", {"resid_mid.3": 40, "resid_post.3": 24}, docs, dtype)
    report = rank1fast.analyze(tmp_path / "dump", skip_positions=1, progress=False)
    assert report.sites == ["resid_mid.3", "resid_post.3"]
    assert report.modules == {"resid_mid.3": "layers.0.proj", "resid_post.3": "layers.1.proj"}
    for site, t in truth.items():
        keep = t["position"] >= 1
        check_stats(report[site], t["x"][keep])
        assert report[site].skipped == len(docs)
        np.testing.assert_allclose(
            report[site].sink_mean, t["x"][~keep].mean(0), rtol=1e-12, atol=1e-12
        )
        counts = np.bincount(t["document"][keep] % K, minlength=K)
        np.testing.assert_array_equal(report[site].stats.fold_count(), counts)

    # Shards analysed one by one (as bare files) and merged give the same report.
    parts = [
        rank1fast.analyze(p, progress=False)
        for p in sorted((tmp_path / "dump").glob("shard-*.safetensors"))
    ]
    merged = rank1fast.merge(parts)
    for site in truth:
        a, b = report[site], merged[site]
        assert a.count == b.count
        np.testing.assert_allclose(b.mean, a.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b.var, a.var, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(b.min, a.min)
        assert_moments_close(b.second_moment, a.second_moment, a.var, a.second_moment)
        np.testing.assert_array_equal(b.stats.fold_count(), a.stats.fold_count())
        np.testing.assert_allclose(b.stats.fold_sum(), a.stats.fold_sum(), rtol=1e-12)
        np.testing.assert_allclose(b.sink_mean, a.sink_mean, rtol=1e-12, atol=1e-12)
        assert b.direction.ridge == a.direction.ridge
        assert b.direction.error == pytest.approx(a.direction.error, rel=1e-4)
        keep = truth[site]["position"] >= 1
        assert_same_direction(
            b.direction.vector, a.direction.vector, truth[site]["x"][keep], a.direction.error
        )


def test_one_site_across_files_is_one_site(tmp_path: Path) -> None:
    x = activations(1500, 20, seed=6)
    for i, part in enumerate(np.split(x, [700])):
        data, _ = encode(part, "float32")
        write_safetensors(tmp_path / f"p{i}.safetensors", {"h": ("float32", part.shape, data)})
    report = rank1fast.analyze(tmp_path, progress=False)
    assert report.sites == ["h"]
    check_stats(report["h"], x.astype(np.float64))


def test_constant_direction_matches_brute_force_cv(tmp_path: Path) -> None:
    docs = [int(v) for v in np.random.default_rng(7).integers(20, 300, size=40)]
    truth = write_dump(tmp_path / "dump", {"s": 24}, docs, "float32")["s"]
    s = rank1fast.analyze(tmp_path / "dump", progress=False)["s"]
    keep = truth["position"] >= 1
    x, fold = truth["x"][keep], truth["document"][keep] % K
    d = s.direction
    assert d.cross_validated
    ref = cv_reference(x, fold, d.ridges)
    best = int(np.argmin(ref))
    # Same held-out curve (closed form vs. explicit held-out residuals) and the same choice.
    np.testing.assert_allclose(d.cv_errors, ref, rtol=1e-4)
    assert d.ridge == pytest.approx(d.ridges[best])
    assert d.error == pytest.approx(ref[best], rel=1e-4)
    g = x.T @ x / len(x)
    b = np.linalg.solve(g + d.ridge * np.trace(g) / x.shape[1] * np.eye(x.shape[1]), x.mean(0))
    assert_same_direction(d.vector, b, x, d.error)
    # The least-squares direction is far closer to constant than any single dimension.
    j, err = onehot_reference(x, fold)
    assert s.onehot.dims == [j]
    assert s.onehot.error == pytest.approx(err, rel=1e-9)
    np.testing.assert_allclose(s.onehot.vector[j], 1.0 / x[:, j].mean())
    assert d.error < s.onehot.error / 5


def test_bare_2d_folds_are_row_blocks(tmp_path: Path) -> None:
    x = activations(7 * BLOCK + 11, 12, seed=8, massive_cv=0.1)
    np.save(tmp_path / "a.npy", x)
    s = rank1fast.analyze(tmp_path / "a.npy", progress=False)["a"]
    fold = (np.arange(len(x)) // BLOCK) % K
    np.testing.assert_array_equal(s.stats.fold_count(), np.bincount(fold, minlength=K))
    ref = cv_reference(x.astype(np.float64), fold, s.direction.ridges)
    np.testing.assert_allclose(s.direction.cv_errors, ref, rtol=1e-4)


def test_moment_rows_caps_the_second_moments_only(tmp_path: Path) -> None:
    # 8 chunks of 8192 rows (16 MiB of float32 at dim 64 is more than a chunk holds); a cap of
    # 20,000 rows takes 2 whole chunks, spread evenly: chunks 0 and 4.
    n, d, chunk = 8 * 8192, 64, 8192
    x = activations(n, d, seed=12, massive_cv=0.05)
    np.save(tmp_path / "a.npy", x)
    full = rank1fast.analyze(tmp_path / "a.npy", progress=False)["a"]
    s = rank1fast.analyze(tmp_path / "a.npy", moment_rows=20_000, progress=False)["a"]
    x64 = x.astype(np.float64)
    check_stats(s, x64)  # every row still counts in the per-dimension statistics
    assert s.count == n and s.moment_count == 2 * chunk and full.moment_count == n
    rows = np.r_[0:chunk, 4 * chunk : 5 * chunk]
    xs = x64[rows]
    g = xs.T @ xs / len(rows)
    assert_moments_close(s.second_moment, g, np.var(xs, axis=0), g)
    fold = (rows // BLOCK) % K
    np.testing.assert_array_equal(s.stats.fold_count(), np.bincount(fold, minlength=K))
    ref = cv_reference(xs, fold, s.direction.ridges)
    np.testing.assert_allclose(s.direction.cv_errors, ref, rtol=1e-4)
    assert s.summary()["moment_count"] == 2 * chunk and "moment_count" not in full.summary()
    # A cap above the row count changes nothing.
    same = rank1fast.analyze(tmp_path / "a.npy", moment_rows=n, progress=False)["a"]
    assert same.moment_count == n
    np.testing.assert_allclose(same.direction.vector, full.direction.vector, rtol=1e-6)
    with pytest.raises(rank1fast.InvalidArgumentError, match="moment_rows"):
        rank1fast.analyze(tmp_path / "a.npy", moment_rows=0, progress=False)
    with pytest.raises(rank1fast.InvalidArgumentError, match="moment_rows"):
        rank1fast.analyze(tmp_path / "a.npy", moment_rows=10, cluster="ray", progress=False)
    out = tmp_path / "r.json"
    subprocess.run(
        [sys.executable, "-m", "rank1fast", "analyze", str(tmp_path / "a.npy"), "-q"]
        + ["--moment-rows", "20000", "--json", str(out)],
        check=True,
    )
    summary = json.loads(out.read_text())
    site = summary["sites"][0] if "sites" in summary else summary["a"]
    assert site["moment_count"] == 2 * chunk


def test_without_second_moments(tmp_path: Path) -> None:
    x = activations(1000, 16, seed=9)
    np.save(tmp_path / "a.npy", x)
    s = rank1fast.analyze(tmp_path / "a.npy", second_moments=False, progress=False)["a"]
    assert s.direction is None and s.second_moment is None
    check_stats(s, x.astype(np.float64))
    assert s.onehot.dims == [1]


def test_save_load_roundtrip(tmp_path: Path) -> None:
    write_dump(tmp_path / "dump", {"a": 16, "b": 8}, [50, 60, 70, 80, 90, 40], "bfloat16")
    report = rank1fast.analyze(tmp_path / "dump", progress=False)
    path = report.save(tmp_path / "report.npz")
    back = rank1fast.Report.load(path)
    assert back.sites == report.sites and back.modules == report.modules
    assert back.skip_positions == report.skip_positions
    for s in report:
        t = back[s.name]
        for key in ("mean", "var", "min", "max", "second_moment", "sink_mean"):
            np.testing.assert_array_equal(getattr(t, key), getattr(s, key))
        np.testing.assert_array_equal(t.direction.vector, s.direction.vector)
        assert (t.count, t.dtype, t.nonfinite, t.skipped) == (s.count, s.dtype, 0, s.skipped)
    text = str(back)
    assert "a" in text and "least-sq err" in text


def test_progress_callback_and_threads(tmp_path: Path) -> None:
    x = activations(20_000, 64, seed=10)
    np.save(tmp_path / "a.npy", x)
    calls: list[tuple[int, int]] = []
    one = rank1fast.analyze(
        tmp_path / "a.npy", threads=1, progress=lambda d, t: calls.append((d, t))
    )
    assert calls and calls[-1] == (x.nbytes, x.nbytes)
    two = rank1fast.analyze(tmp_path / "a.npy", threads=2, progress=False)
    np.testing.assert_allclose(one["a"].mean, two["a"].mean, rtol=1e-13)
    np.testing.assert_allclose(one["a"].var, two["a"].var, rtol=1e-11)


def test_sites_filter_and_unknown_site(tmp_path: Path) -> None:
    write_dump(tmp_path / "dump", {"a": 8, "b": 8}, [30, 40, 50], "float32")
    assert rank1fast.analyze(tmp_path / "dump", sites="b", progress=False).sites == ["b"]
    with pytest.raises(rank1fast.InvalidArgumentError, match='"zzz".*a, b'):
        rank1fast.analyze(tmp_path / "dump", sites=["zzz"], progress=False)
    with pytest.raises(rank1fast.InvalidArgumentError):
        rank1fast.analyze(tmp_path / "dump", folds=0, progress=False)


# -- bad input --------------------------------------------------------------------------------


def test_missing_path_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        rank1fast.analyze(tmp_path / "nope.safetensors")
    with pytest.raises(rank1fast.PathNotFoundError):
        rank1fast.analyze(tmp_path / "nope.safetensors")


def _good_file(path: Path, dtype: str = "float32") -> bytes:
    x = activations(100, 8)
    data, _ = encode(x, dtype)
    write_safetensors(path, {"h": (dtype, (100, 8), data)})
    return path.read_bytes()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-10], "out of range"),
        (lambda b: b[:5], "truncated"),
        (lambda b: (10**9).to_bytes(8, "little") + b[8:], "header length"),
        (lambda b: b[:8] + b"}" + b[9:], "JSON"),
    ],
)
def test_malformed_safetensors_is_dump_error(tmp_path: Path, mutate, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(mutate(_good_file(path)))
    with pytest.raises(rank1fast.DumpError, match=message) as e:
        rank1fast.analyze(path, progress=False)
    assert "bad.safetensors" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_unsupported_dtype_names_file_and_tensor(tmp_path: Path) -> None:
    write_safetensors(
        tmp_path / "f64.safetensors",
        {"acts": ("float64", (10, 4), np.zeros((10, 4)).tobytes())},
    )
    with pytest.raises(rank1fast.DumpError, match=r"f64.safetensors \[acts\].*float64"):
        rank1fast.analyze(tmp_path / "f64.safetensors", progress=False)
    np.save(tmp_path / "x.npy", np.zeros((4, 4)))
    with pytest.raises(rank1fast.DumpError, match="x.npy.*'<f8'"):
        rank1fast.analyze(tmp_path / "x.npy", progress=False)


def test_dims_that_disagree_between_files(tmp_path: Path) -> None:
    for i, d in enumerate([8, 9]):
        data, _ = encode(activations(10, d), "float32")
        write_safetensors(tmp_path / f"p{i}.safetensors", {"h": ("float32", (10, d), data)})
    with pytest.raises(rank1fast.DumpError, match=r"p1.safetensors \[h\].*dim 9.*dim 8"):
        rank1fast.analyze(tmp_path, progress=False)


def test_a_file_without_sites_names_what_it_passed_over(tmp_path: Path) -> None:
    data = np.zeros(120, np.float32).tobytes()
    write_safetensors(tmp_path / "w.safetensors", {"x": ("float32", (2, 3, 4, 5), data)})
    with pytest.raises(
        rank1fast.DumpError, match=r"float tensor found \(passed over: x \[2, 3, 4, 5\]\)"
    ):
        rank1fast.analyze(tmp_path / "w.safetensors", progress=False)


def test_manifest_cannot_leave_the_dump(tmp_path: Path) -> None:
    write_dump(tmp_path / "dump", {"a": 8}, [30, 40], "float32")
    m = json.loads((tmp_path / "dump/manifest.json").read_text())
    m["shards"][0]["file"] = "../outside.safetensors"
    (tmp_path / "dump/manifest.json").write_text(json.dumps(m))
    with pytest.raises(rank1fast.DumpError, match="leaves the dump directory"):
        rank1fast.analyze(tmp_path / "dump", progress=False)
    (tmp_path / "dump/manifest.json").write_text("{not json")
    with pytest.raises(rank1fast.DumpError, match="manifest.json.*JSON"):
        rank1fast.analyze(tmp_path / "dump", progress=False)


def test_manifest_must_agree_with_its_shards(tmp_path: Path) -> None:
    write_dump(tmp_path / "dump", {"a": 8}, [30, 40], "float32", shard_docs=1)
    good = json.loads((tmp_path / "dump/manifest.json").read_text())
    twice = {**good, "shards": good["shards"] + good["shards"][:1]}
    (tmp_path / "dump/manifest.json").write_text(json.dumps(twice))
    with pytest.raises(rank1fast.DumpError, match=r'manifest.json: shard "shard-00000.* twice'):
        rank1fast.analyze(tmp_path / "dump", progress=False)
    (tmp_path / "dump/manifest.json").write_text(json.dumps({**good, "version": 2}))
    with pytest.raises(rank1fast.DumpError, match=r"unsupported dump version 2 \(this reader"):
        rank1fast.analyze(tmp_path / "dump", progress=False)
    wrong = {**good, "sites": {"a": {**good["sites"]["a"], "dtype": "bfloat16"}}}
    (tmp_path / "dump/manifest.json").write_text(json.dumps(wrong))
    with pytest.raises(
        rank1fast.DumpError,
        match=r"00000.safetensors \[a\]: manifest says dtype bfloat16 but the tensor is float32",
    ):
        rank1fast.analyze(tmp_path / "dump", progress=False)


# -- command line -----------------------------------------------------------------------------


def test_cli_analyze_writes_json_and_report(tmp_path: Path) -> None:
    write_dump(tmp_path / "dump", {"resid_mid.1": 16}, [50, 60, 70, 80, 90, 40], "bfloat16")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rank1fast",
            "analyze",
            str(tmp_path / "dump"),
            "--json",
            str(tmp_path / "r.json"),
            "--save",
            str(tmp_path / "r.npz"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "resid_mid.1" in out.stdout and "least-sq err" in out.stdout
    summary = json.loads((tmp_path / "r.json").read_text())
    site = summary["sites"][0]
    assert site["site"] == "resid_mid.1" and site["count"] == 390 - 6
    assert rank1fast.Report.load(tmp_path / "r.npz").sites == ["resid_mid.1"]
    bad = subprocess.run(
        [sys.executable, "-m", "rank1fast", "analyze", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "no such file" in bad.stderr


def test_site_without_finite_rows_is_an_error(tmp_path: Path) -> None:
    np.save(tmp_path / "nan.npy", np.full((50, 4), np.nan, np.float32))
    with pytest.raises(rank1fast.DumpError, match=r"nan.npy \[nan\].*all 50 rows"):
        rank1fast.analyze(tmp_path / "nan.npy", progress=False)


def test_site_with_every_row_before_skip_positions_is_an_error(tmp_path: Path) -> None:
    write_dump(tmp_path / "dump", {"a": 8}, [30, 40], "float32")
    with pytest.raises(rank1fast.DumpError, match=r"dump \[a\]: all 70 rows .*positions < skip"):
        rank1fast.analyze(tmp_path / "dump", skip_positions=100, progress=False)
    assert rank1fast.analyze(tmp_path / "dump", skip_positions=35, progress=False)["a"].count == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"folds": 2.5},
        {"folds": True},
        {"folds": 0},
        {"skip_positions": -5},
        {"threads": 0},
        {"threads": -1},
        {"memory_limit": -1},
        {"moment_rows": 0},
        {"moment_rows": "100"},
    ],
)
def test_arguments_out_of_range_are_named(tmp_path: Path, kwargs: dict) -> None:
    write_dump(tmp_path / "dump", {"a": 8}, [30, 40], "float32")
    (name,) = kwargs
    with pytest.raises(rank1fast.InvalidArgumentError, match=f"^{name} must be an integer"):
        rank1fast.analyze(tmp_path / "dump", progress=False, **kwargs)
    # numpy integers are integers; a cap beyond any dump is no cap.
    r = rank1fast.analyze(tmp_path / "dump", folds=np.int64(2), moment_rows=10**30, progress=False)
    assert r["a"].moment_count == r["a"].count == 68


def test_save_into_a_directory_fails_cleanly(tmp_path: Path) -> None:
    write_dump(tmp_path / "dump", {"a": 8}, [30, 40], "float32")
    report = rank1fast.analyze(tmp_path / "dump", progress=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(rank1fast.Rank1IOError, match="out: cannot write the report"):
        report.save(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump", "out"]  # no out.tmp
    for option in ("--json", "--save"):
        for target, why in ((tmp_path / "out", "is a directory"), (tmp_path / "no/r", "not exist")):
            bad = subprocess.run(
                [sys.executable, "-m", "rank1fast", "analyze", str(tmp_path / "dump")]
                + [option, str(target), "-q"],
                capture_output=True,
                text=True,
            )
            assert bad.returncode == 1 and f"{option} {target}: " in bad.stderr, bad.stderr
            assert why in bad.stderr


def test_ctrl_c_interrupts_within_a_second(tmp_path: Path) -> None:
    import _thread
    import signal
    import threading
    import time

    x = np.random.default_rng(0).normal(size=(400_000, 512)).astype(np.float32)  # 800 MB
    np.save(tmp_path / "big.npy", x)
    del x
    # A process started in the background by a shell without job control inherits SIGINT
    # ignored, and interrupt_main() then does nothing: give it Python's own handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, _thread.interrupt_main)
    try:
        start = time.perf_counter()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            rank1fast.analyze(tmp_path / "big.npy", threads=1, progress=False)
        elapsed = time.perf_counter() - start
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert elapsed < 1.5, elapsed  # 0.5 s until the interrupt + at most a second to stop


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda x: np.concatenate([x, x[:, :1]], axis=1), "duplicated"),
        (lambda x: np.concatenate([x, np.full((len(x), 1), 3.0, np.float32)], axis=1), "constant"),
        (lambda x: x[:10], "fewer tokens"),
    ],
)
def test_singular_second_moments_warn_and_still_solve(tmp_path: Path, make, reason) -> None:
    from rank1fast.errors import RankDeficientWarning

    x = make(activations(2000, 16, seed=11, massive_cv=0.1))
    np.save(tmp_path / "a.npy", x)
    s = rank1fast.analyze(tmp_path / "a.npy", progress=False)["a"]
    with pytest.warns(RankDeficientWarning, match=reason):
        d = s.direction
    assert np.isfinite(d.vector).all() and np.isfinite(d.error)


def test_well_conditioned_site_does_not_warn(tmp_path: Path) -> None:
    import warnings

    np.save(tmp_path / "a.npy", activations(2000, 16, seed=12, massive_cv=0.1))
    s = rank1fast.analyze(tmp_path / "a.npy", progress=False)["a"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert s.direction is not None


KERNEL_ENVS = {
    "default": {},  # AMX tiles for bf16 dumps where the CPU has them
    "avx512-bf16": {"RANK1FAST_GRAM": "avx512-bf16"},  # refused (best kernel) on other CPUs
    "no AVX-512": {"RANK1FAST_NO_AVX512": "1"},
    "portable": {"RANK1FAST_NO_AVX512": "1", "RANK1FAST_GRAM": "portable"},
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_every_kernel_path_agrees(tmp_path: Path, dtype: str) -> None:
    """The code picked for this CPU (AVX-512 statistics and second moments, bf16 dot products
    for bf16 dumps where present), the AVX2 code and the portable code give the same report:
    statistics to float64 rounding, second moments to the bf16 kernel's accuracy, each against
    numpy float64 (run in child processes: the switches are read once per process)."""
    x = activations(3000, 70, seed=7)
    data, stored = encode(x, dtype)
    write_safetensors(tmp_path / "a.safetensors", {"h": (dtype, (30, 100, 70), data)})
    keep = (np.arange(3000) % 100) >= 1
    ref = stored[keep].astype(np.float64)
    code = (
        "import sys, numpy as np, rank1fast; s = rank1fast.analyze(sys.argv[1], progress=False)"
        "['h']; np.savez(sys.argv[2], mean=s.mean, var=s.var, min=s.stats.min(), "
        "max=s.stats.max(), m=s.second_moment, k=rank1fast._core.gram_kernels()[1:])"
    )
    got = {}
    for name, env in KERNEL_ENVS.items():
        out = tmp_path / f"{len(got)}.npz"
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "a.safetensors"), str(out)],
            check=True,
            env={**__import__("os").environ, **env},
        )
        got[name] = np.load(out)
    assert str(got["portable"]["k"][1]) == "portable"
    for name, r in got.items():
        np.testing.assert_allclose(r["mean"], ref.mean(0), rtol=1e-12, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(r["var"], ref.var(0), rtol=1e-9, err_msg=name)
        np.testing.assert_array_equal(r["min"], ref.min(0), err_msg=name)
        np.testing.assert_array_equal(r["max"], ref.max(0), err_msg=name)
        cov = r["m"] - np.outer(r["mean"], r["mean"])
        want = np.cov(ref, rowvar=False, bias=True)
        assert_moments_close(cov, want, np.diag(want), ref.T @ ref / len(ref))
