"""rank1fast plot: the PNGs open, have the size asked for, and hold a picture, not a blank page;
the rows behind the b·x − 1 histograms are the dump's (checked against the synthetic truth)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import rank1fast
from rank1fast.errors import InvalidArgumentError, PathNotFoundError

sys.path.insert(0, str(Path(__file__).parent))
import synth  # noqa: E402

mpimg = pytest.importorskip("matplotlib.image")
plot_mod = pytest.importorskip("rank1fast.plot")

SITES = {"resid_mid.0": 24, "resid_mid.1": 24, "resid_mid.2": 24, "resid_post.1": 16}


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot") / "dump"
    truth = synth.write_dump(root, SITES, docs=[40, 31, 57, 22, 45], dtype="bfloat16")
    return root, truth


def _fidelity_json(path: Path) -> Path:
    sites = []
    for i, site in enumerate(["resid_mid.1", "resid_post.1", "all"]):
        sites.append(
            {
                "site": site,
                "modules": [f"m.{i}"],
                "steering_kl_mean": 0.3 + i,
                "steering_kl_p99": 1.0,
                "position_bins": [[0, 0], [1, 1], [2, 3], [4, 7]],
                "steering_kl_by_position": [0.01, 0.5, 0.4, 0.3],
                "tokens_by_position": [2, 2, 4, 8],
                "adapters": {
                    "least-squares": {
                        "kl_mean": 1e-3,
                        "kl_p99": 1e-2,
                        "ratio": 1e-3 * (i + 1),
                        "output_error": 0.01,
                        "kl_by_position": [0.005, 1e-3, 5e-4, 3e-4],
                    },
                    "one-hot": {
                        "kl_mean": 1e-2,
                        "kl_p99": 1e-1,
                        "ratio": 1e-1 / (i + 1),
                        "output_error": 0.1,
                    },
                },
            }
        )
    doc = {"model": "m", "adapters": {"least-squares": "a", "one-hot": "b"}, "scale": 1.0}
    path.write_text(json.dumps({**doc, "texts": 2, "tokens": 100, "sites": sites}))
    return path


def _check_png(path: Path, size_px: tuple[int, int]) -> None:
    """Opens as a PNG of ``size_px`` (width, height) that holds a drawing: several colours,
    and not one colour over nearly all of it."""
    assert path.suffix == ".png" and path.stat().st_size > 5_000, path
    img = mpimg.imread(path)
    assert img.shape[1::-1] == size_px, (path, img.shape)
    rgb = np.round(img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colours, counts = np.unique(rgb, axis=0, return_counts=True)
    assert len(colours) > 20, (path, len(colours))
    assert counts.max() < 0.97 * len(rgb), (path, counts.max() / len(rgb))


def test_plot_dump_and_fidelity_via_cli(dump, tmp_path, capsys):
    from rank1fast.cli import main

    root, _ = dump
    fid = _fidelity_json(tmp_path / "fidelity.json")
    out = tmp_path / "plots"
    assert main(["plot", str(root), "-o", str(out), "--fidelity", str(fid), "--rows", "100"]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(Path(p).name for p in printed)
    assert names == sorted(
        ["outliers-resid_mid.png", "outliers-resid_post.png", "errors.png", "fidelity.png"]
        + ["fidelity-positions.png"]
        + [f"residuals-{s}.png" for s in SITES]
    )
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        _check_png(
            out / name, (750, 420) if name.startswith(("outliers", "residuals")) else (600, 420)
        )


def test_plot_report_npz_finds_its_dump(dump, tmp_path):
    root, _ = dump
    report = rank1fast.analyze(root, progress=False)
    saved = report.save(tmp_path / "report.npz")
    written = plot_mod.plot(saved, tmp_path / "a", sites=["resid_mid.1"])
    assert [p.name for p in written] == [
        "outliers-resid_mid.png",
        "errors.png",
        "residuals-resid_mid.1.png",
    ]
    # A report whose dump is gone: the pictures the report alone gives.
    report.source = str(tmp_path / "gone")
    written = plot_mod.plot(report, tmp_path / "b")
    assert sorted(p.name for p in written) == [
        "errors.png",
        "outliers-resid_mid.png",
        "outliers-resid_post.png",
    ]


def test_residual_rows_are_the_dumps(dump):
    # The rows behind the histograms: every stored row at position >= skip, in order.
    root, truth = dump
    t = truth["resid_mid.2"]
    keep = t["position"] >= 1
    rows, total = plot_mod._dump_rows(root, "resid_mid.2", 1, 10_000)
    assert total == int(keep.sum()) == len(rows)
    np.testing.assert_array_equal(rows, t["x"][keep].astype(np.float32))
    first, total = plot_mod._dump_rows(root, "resid_mid.2", 3, 50)
    np.testing.assert_array_equal(first, t["x"][t["position"] >= 3][:50].astype(np.float32))
    assert total == int((t["position"] >= 3).sum())


def test_outlier_lines_follow_the_largest_means(dump, tmp_path, monkeypatch):
    # The dimensions drawn are the top |mean| of each layer: synth plants 1 (1e4), 5 and 9.
    root, truth = dump
    report = rank1fast.analyze(root, progress=False)
    drawn = []
    real = plot_mod._plot_family

    def spy(family, members, out, top, skip):
        drawn.append((family, [layer for layer, _ in members]))
        return real(family, members, out, top, skip)

    monkeypatch.setattr(plot_mod, "_plot_family", spy)
    plot_mod.plot_report(report, tmp_path, top=3)
    assert drawn == [("resid_mid.*", [0, 1, 2]), ("resid_post.*", [1])]
    x = truth["resid_mid.0"]["x"][truth["resid_mid.0"]["position"] >= 1]
    top3 = set(np.argsort(-np.abs(x.mean(axis=0)))[:3].tolist())
    assert top3 == {1, 5, 9}


def test_site_family():
    assert plot_mod.site_family("resid_mid.15") == ("resid_mid.*", 15)
    assert plot_mod.site_family("model.layers.3.mlp.down_proj") == (
        "model.layers.*.mlp.down_proj",
        3,
    )
    assert plot_mod.site_family("lm_head") == ("lm_head", None)


def test_bad_inputs(dump, tmp_path, monkeypatch):
    root, _ = dump
    with pytest.raises(PathNotFoundError):
        plot_mod.plot(tmp_path / "nothing", tmp_path / "o")
    with pytest.raises(InvalidArgumentError, match="nope.* is not in"):
        plot_mod.plot(root, tmp_path / "o", sites=["nope"])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(InvalidArgumentError, match="not a fidelity result"):
        plot_mod.plot_fidelity(tmp_path / "x.json", tmp_path / "o")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(InvalidArgumentError, match="pip install matplotlib"):
        plot_mod.plot(root, tmp_path / "o")
