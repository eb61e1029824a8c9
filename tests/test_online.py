"""collect(statistics=True): statistics accumulated with torch during collection equal those
analyze computes from a dump of the same collection (issue 5, online statistics)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import rank1fast  # noqa: E402
from rank1fast.errors import InvalidArgumentError  # noqa: E402
from rank1fast.models import get_module, resolve_sites  # noqa: E402

SITES = "resid_mid.1,resid_post.2"
ARRAYS = ("mean", "m2", "min", "max", "fold_sum", "fold_sumsq", "fold_moment", "skipped_sum")


def poison(model, site: str, every: int = 37):
    """Make the input of a site hold NaN/Inf at some tokens, before collect's hook sees it.

    The same tokens of the same batch in every run (first tokens of documents among them).
    """
    module = get_module(model, resolve_sites(model, site)[site])

    def pre(mod, args):
        x = args[0].clone()
        flat = x.view(-1, x.shape[-1])
        flat[::every, 3] = float("nan")
        flat[5 :: every * 3, 0] = float("inf")
        return (x, *args[1:])

    return module.register_forward_pre_hook(pre)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_online_statistics_equal_the_dump_analysis(tiny_llama, tokenizer, prose, tmp_path, storage):
    model = (tiny_llama, tokenizer)
    kw = dict(batch_size=3, max_length=48, storage_dtype=storage, progress=False)
    handle = poison(tiny_llama, "resid_post.2")
    try:
        dump = rank1fast.collect(model, prose[:20], SITES, tmp_path / "d", max_tokens=700, **kw)
        online = rank1fast.collect(
            model, prose[:20], SITES, statistics=True, max_tokens=700, folds=4, **kw
        )
    finally:
        handle.remove()
    offline = rank1fast.analyze(dump.path, folds=4, progress=False)
    assert online.sites == offline.sites == ["resid_mid.1", "resid_post.2"]
    assert online.modules == offline.modules
    for site in online.sites:
        a, b = online[site].stats, offline[site].stats
        assert (a.count, a.nonfinite, a.skipped) == (b.count, b.nonfinite, b.skipped), site
        assert a.dtype == b.dtype == storage
        np.testing.assert_array_equal(a.fold_count(), b.fold_count())
        for name in ARRAYS:
            x, y = getattr(a, name)(), getattr(b, name)()
            # Both sum second moments as float32 Gram matrices of shifted rows (in other
            # orders, about other shifts): float32 rounding. Everything else is float64.
            tol = 1e-5 if name == "fold_moment" else 1e-9
            scale = np.abs(y).max() or 1.0
            np.testing.assert_allclose(x, y, rtol=tol, atol=tol * scale, err_msg=name)
        da, db = online[site].direction, offline[site].direction
        assert da.ridge == db.ridge
        np.testing.assert_allclose(da.vector, db.vector, atol=1e-4 * np.abs(db.vector).max())
        assert da.error == pytest.approx(db.error, rel=1e-4)
    assert offline["resid_post.2"].stats.nonfinite > 0  # the poison reached both


def test_without_second_moments_and_errors(tiny_llama, tokenizer, prose, tmp_path):
    model = (tiny_llama, tokenizer)
    report = rank1fast.collect(
        model, prose[:4], "resid_mid.1", statistics=True, second_moments=False, progress=False
    )
    s = report["resid_mid.1"]
    assert s.stats.count > 0 and s.stats.fold_moment() is None and s.direction is None
    with pytest.raises(InvalidArgumentError, match="writes no dump"):
        rank1fast.collect(model, prose[:4], "resid_mid.1", tmp_path / "x", statistics=True)
    with pytest.raises(InvalidArgumentError, match="required unless statistics"):
        rank1fast.collect(model, prose[:4], "resid_mid.1")
    assert not (tmp_path / "x").exists()


def test_online_report_saves_and_writes_the_same_adapter(tiny_llama, tokenizer, prose, tmp_path):
    model = (tiny_llama, tokenizer)
    kw = dict(batch_size=4, max_length=40, storage_dtype="float32", progress=False)
    online = rank1fast.collect(model, prose[:24], "resid_mid.1", statistics=True, **kw)
    dump = rank1fast.collect(model, prose[:24], "resid_mid.1", tmp_path / "d", **kw)
    offline = rank1fast.analyze(dump.path, progress=False)
    loaded = rank1fast.Report.load(online.save(tmp_path / "online.npz"))
    v = {"resid_mid.1": np.random.default_rng(0).normal(size=64)}
    a = rank1fast.write_adapter(loaded, v, tmp_path / "a-online")
    b = rank1fast.write_adapter(offline, v, tmp_path / "a-dump")
    from safetensors.numpy import load_file

    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=1e-3, atol=1e-4 * np.abs(tb[k]).max())
    ca = (a / "adapter_config.json").read_text()
    assert '"model.layers.1.self_attn.o_proj"' in ca
