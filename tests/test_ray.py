"""rank1fast on a Ray cluster: distributed analysis equals one process, a dead worker is
retried, and a collection by two workers analyses like one by a single worker.

One local Ray cluster (2 CPUs) serves the whole module: starting Ray takes seconds.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import rank1fast
from rank1fast.cli import main
from rank1fast.distributed import collect_part, join_parts
from synth import activations, encode, write_dump, write_safetensors
from test_analyze import assert_same_direction

ray = pytest.importorskip("ray")

SITES = {"resid_mid.3": 40, "resid_post.3": 24}
DOCS = [37, 120, 5, 64, 200, 90, 1, 77, 150, 33, 48, 260, 19, 88, 140, 70, 3, 111, 56, 95]


def _crash_once_hook(armed: str, crashed: str):
    """A Ray worker setup hook: while ``armed`` exists, the first analysis in any worker kills
    its process (as a machine failure would) and leaves ``crashed`` behind."""

    def hook() -> None:
        import rank1fast._core as core

        analyze = core.analyze

        def crashing(*args, **kwargs):
            if os.path.exists(armed):
                try:
                    os.close(os.open(crashed, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    pass
                else:
                    os._exit(1)
            return analyze(*args, **kwargs)

        core.analyze = crashing

    return hook


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster with 2 worker CPUs and a switch that crashes one task."""
    base = tmp_path_factory.mktemp("ray")
    switch = {"armed": base / "armed", "crashed": base / "crashed"}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={"worker_process_setup_hook": _crash_once_hook(*map(str, switch.values()))},
    )
    yield switch
    ray.shutdown()


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> Path:
    """A bfloat16 dump of 20 documents in 10 shards."""
    path = tmp_path_factory.mktemp("dump") / "d"
    write_dump(path, SITES, DOCS, "bfloat16", shard_docs=2, seed=3)
    return path


def assert_same_report(a: rank1fast.Report, b: rank1fast.Report, rows: dict | None = None) -> None:
    """b equals a: every sum to float64 rounding (1e-12 relative; second moments too, since
    every task accumulates them about the one-process shift), and the same direction."""
    assert a.sites == b.sites
    for name in a.sites:
        x, y = a[name], b[name]
        assert (x.count, x.dim, x.dtype, x.skipped, x.nonfinite) == (
            y.count,
            y.dim,
            y.dtype,
            y.skipped,
            y.nonfinite,
        )
        np.testing.assert_array_equal(y.stats.fold_count(), x.stats.fold_count())
        np.testing.assert_array_equal(y.min, x.min)
        np.testing.assert_array_equal(y.max, x.max)
        np.testing.assert_allclose(y.mean, x.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(y.var, x.var, rtol=1e-12)
        np.testing.assert_allclose(y.stats.fold_sum(), x.stats.fold_sum(), rtol=1e-12, atol=1e-9)
        if x.skipped:
            np.testing.assert_allclose(y.sink_mean, x.sink_mean, rtol=1e-12, atol=1e-12)
        scale = np.abs(x.stats.fold_moment()).max()
        np.testing.assert_allclose(
            y.stats.fold_moment(), x.stats.fold_moment(), rtol=1e-12, atol=1e-12 * scale
        )
        assert y.direction.ridge == x.direction.ridge
        assert y.direction.error == pytest.approx(x.direction.error, rel=1e-9)
        assert [o.dim for o in y.outliers] == [o.dim for o in x.outliers]
        assert y.onehot.dims == x.onehot.dims
        if rows is not None:
            assert_same_direction(y.direction.vector, x.direction.vector, rows[name], 1e-3)


def kept_rows(truth: dict) -> dict:
    return {s: t["x"][t["position"] >= 1] for s, t in truth.items()}


# --------------------------------------------------------------------------- analysis


def test_site_stats_pickle(tmp_path: Path) -> None:
    x = activations(300, 12, seed=1)
    data, _ = encode(x, "float32")
    write_safetensors(tmp_path / "a.safetensors", {"h": ("float32", x.shape, data)})
    r = rank1fast.analyze(tmp_path / "a.safetensors", progress=False)
    back = pickle.loads(pickle.dumps(r))
    assert back.sites == ["h"] and back["h"].count == 300
    np.testing.assert_array_equal(back["h"].stats.fold_moment(), r["h"].stats.fold_moment())
    np.testing.assert_array_equal(back["h"].stats.fold_count(), r["h"].stats.fold_count())


def test_distributed_equals_one_process(cluster, dump: Path, tmp_path: Path) -> None:
    truth = write_dump(tmp_path / "again", SITES, DOCS, "bfloat16", shard_docs=2, seed=3)
    assert len(rank1fast.Dump.open(dump).shards) >= 8
    one = rank1fast.analyze(dump, progress=False)
    many = rank1fast.analyze(dump, cluster="ray", progress=False)
    assert_same_report(one, many, kept_rows(truth))
    assert many.modules == one.modules and many.source == str(dump)

    # Units of several shards, a site selection, another merge fan-in: the same numbers.
    some = rank1fast.distributed.analyze(
        dump, sites=["resid_post.3"], shards_per_task=3, fanin=2, progress=False
    )
    assert some.sites == ["resid_post.3"]
    np.testing.assert_allclose(some["resid_post.3"].mean, one["resid_post.3"].mean, rtol=1e-12)
    assert some["resid_post.3"].direction.ridge == one["resid_post.3"].direction.ridge


def test_row_block_folds_without_documents(cluster, tmp_path: Path) -> None:
    # Bare 2-D files have no document ids: folds are 256-row blocks counted within each file,
    # whichever task reads it. Sizes that are no multiple of 256 would expose global offsets.
    for i, n in enumerate([700, 300, 1001, 90, 513, 256, 777, 1200]):
        x = activations(n, 16, seed=i, massive_cv=0.1)
        data, _ = encode(x, "float16")
        write_safetensors(tmp_path / f"part-{i}.safetensors", {"h": ("float16", x.shape, data)})
    np.save(tmp_path / "g.npy", activations(900, 8, seed=9, massive_cv=0.1))
    one = rank1fast.analyze(tmp_path, progress=False)
    many = rank1fast.analyze(tmp_path, cluster="ray", progress=False)
    assert one.sites == many.sites == ["g", "h"]  # files in name order
    assert_same_report(one, many)


def test_dead_worker_is_retried(cluster, dump: Path) -> None:
    one = rank1fast.analyze(dump, progress=False)
    cluster["armed"].touch()
    try:
        many = rank1fast.distributed.analyze(dump, max_retries=2, progress=False)
    finally:
        cluster["armed"].unlink()
    assert cluster["crashed"].exists(), "no task was killed"
    assert_same_report(one, many)


def test_errors_and_cli(cluster, dump: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    with pytest.raises(rank1fast.InvalidArgumentError, match="not in"):
        rank1fast.analyze(dump, cluster="ray", sites="resid_mid.9", progress=False)
    with pytest.raises(rank1fast.PathNotFoundError):
        rank1fast.analyze(tmp_path / "nothing", cluster="ray", progress=False)
    with pytest.raises(rank1fast.InvalidArgumentError, match="cluster="):
        rank1fast.analyze(dump, cluster="slurm", progress=False)
    # A truncated shard: the task's DumpError reaches the caller, naming the real file.
    bad = tmp_path / "bad"
    write_dump(bad, SITES, DOCS[:6], "float32", shard_docs=2)
    shard = bad / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(rank1fast.DumpError, match=str(shard)):
        rank1fast.analyze(bad, cluster="ray", progress=False)

    out = tmp_path / "r.json"
    assert main(["analyze", str(dump), "--ray", "--json", str(out), "-q"]) == 0
    assert out.exists()
    # A relative path: the workers run in other directories.
    monkeypatch.chdir(dump.parent)
    assert main(["analyze", dump.name, "--ray", "-q"]) == 0
    # A site that no row reached is refused on the merged statistics, as in one process.
    with pytest.raises(rank1fast.DumpError, match=r"all .* rows .*positions < skip"):
        rank1fast.analyze(dump.name, cluster="ray", skip_positions=10**6, progress=False)

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(rank1fast.InvalidArgumentError, match=r"pip install 'rank1fast\[ray\]'"):
        rank1fast.analyze(dump, cluster="ray", progress=False)


# --------------------------------------------------------------------------- collection

COLLECT = {"max_length": 48, "batch_size": 4, "shard_tokens": 150, "storage_dtype": "float32"}
CSITES = "resid_mid.1,resid_post.2"


def rows_by_token(dump: rank1fast.Dump) -> dict[str, np.ndarray]:
    """Every tensor of a dump, rows sorted by (document, position)."""
    doc = dump.read("document").numpy()
    pos = dump.read("position").numpy()
    order = np.lexsort((pos, doc))
    out = {"document": doc[order], "position": pos[order]}
    for site in dump.sites:
        out[site] = dump.read(site).numpy()[order]
    return out


def assert_same_collection(one: rank1fast.Dump, many: rank1fast.Dump) -> None:
    a, b = rows_by_token(one), rows_by_token(many)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    assert many.tokens == one.tokens and many.complete
    assert_same_report(rank1fast.analyze(one.path, progress=False), many.analyze(progress=False))


def test_collect_with_two_ray_workers(cluster, tiny_llama_dir, prose, tmp_path) -> None:
    texts = prose[:24]
    one = rank1fast.collect(
        str(tiny_llama_dir),
        texts,
        CSITES,
        tmp_path / "one",
        device="cpu",
        progress=False,
        **COLLECT,
    )
    many = rank1fast.distributed.collect(
        str(tiny_llama_dir),
        texts,
        CSITES,
        tmp_path / "many",
        workers=2,
        device="cpu",
        progress=False,
        **COLLECT,
    )
    assert many.manifest["parts"] == ["rank-00000", "rank-00001"]
    assert all(s["file"].startswith("rank-0000") for s in many.manifest["shards"])
    assert_same_collection(one, many)
    # Rerunning finds every part complete and writes the same manifest.
    again = rank1fast.distributed.collect(
        str(tiny_llama_dir), texts, CSITES, tmp_path / "many", workers=2, device="cpu", **COLLECT
    )
    assert again.manifest == many.manifest


def test_collect_parts_in_plain_processes(tiny_llama, tokenizer, prose, tmp_path) -> None:
    # What each of `world` processes runs, here one after the other; max_tokens is the total.
    model, texts = (tiny_llama, tokenizer), prose[:30]
    one = rank1fast.collect(model, texts, CSITES, tmp_path / "one", max_tokens=333, **COLLECT)
    out = tmp_path / "many"
    out.mkdir()
    with pytest.raises(rank1fast.DumpError, match="part 0 of 3 .* is missing"):
        join_parts(out, 3)
    for rank in range(3):
        part = collect_part(
            model, texts, CSITES, out, rank=rank, world=3, max_tokens=333, **COLLECT
        )
        assert part.path == out / f"rank-{rank:05d}"
    # A rerun of a complete part changes nothing.
    collect_part(model, texts, CSITES, out, rank=1, world=3, max_tokens=333, **COLLECT)
    many = join_parts(out)
    assert many.manifest["stopped"] == "max_tokens" and many.tokens == 333
    assert_same_collection(one, many)

    with pytest.raises(rank1fast.DumpError, match="part 1 of 3 workers"):
        collect_part(model, texts, CSITES, out, rank=1, world=2, **COLLECT)
    with pytest.raises(rank1fast.DumpError, match="one collection"):
        collect_part(model, texts, CSITES, one.path, rank=0, world=2, **COLLECT)


# --------------------------------------------------------------------------- collection, CLI

# 222 tokens: documents 0-4 of 48 tokens, the last one cut. The analysis adds float32 Gram
# matrices of each fold's rows within a chunk (a shard here: the command line keeps the default
# shard size); with no more documents than folds (5), every chunk of either dump holds at most
# one document per fold, so the sums agree to float64 rounding, as assert_same_report wants.
CLI_COLLECT = ["--sites", CSITES, "--device", "cpu", "--batch-size", "4", "--max-length", "48"]
CLI_COLLECT += ["--storage-dtype", "float32", "--tokens", "222"]
PART_VARS = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "LOCAL_RANK", "SLURM_LOCALID")


@pytest.fixture
def corpus(prose, tmp_path) -> Path:
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in prose[:8]))
    return path


@pytest.fixture
def no_part_env(monkeypatch):
    for var in PART_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_cli_parts_then_join(tiny_llama_dir, corpus, tmp_path, capsys, no_part_env) -> None:
    # What `torchrun -m rank1fast collect ... --part env` (or a loop over ranks) runs.
    model = [str(tiny_llama_dir), "--corpus", str(corpus), *CLI_COLLECT]
    assert main(["collect", *model, "--out", str(tmp_path / "one"), "-q"]) == 0
    out = tmp_path / "many"
    assert main(["collect", *model, "--out", str(out), "--part", "0/2"]) == 0
    printed = capsys.readouterr().out
    assert "rank-00000" in printed and f"next: rank1fast join {out}" in printed
    no_part_env.setenv("RANK", "1")
    no_part_env.setenv("WORLD_SIZE", "2")
    no_part_env.setenv("SLURM_PROCID", "0")  # torchrun's variables come first
    no_part_env.setenv("SLURM_NTASKS", "3")
    assert main(["collect", *model, "--out", str(out), "--part", "env", "-q"]) == 0
    assert main(["join", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "222 tokens" in printed and "by 2 workers" in printed
    assert f"next: rank1fast analyze {out}" in printed
    many = rank1fast.Dump.open(out)
    assert many.manifest["parts"] == ["rank-00000", "rank-00001"]
    assert_same_collection(rank1fast.Dump.open(tmp_path / "one"), many)
    # A worker rerun with another world is refused by the library (exit 1, not argparse's 2).
    assert main(["collect", *model, "--out", str(out), "--part", "1/3", "-q"]) == 1
    assert "part 1 of 2 workers" in capsys.readouterr().err
    assert main(["join", str(out), "--world", "3", "-q"]) == 1
    assert "part 0 of 2 workers, not part 0 of 3" in capsys.readouterr().err


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_part_and_workers_errors(tmp_path, capsys, no_part_env) -> None:
    out = ["collect", "--sites", CSITES, "--out", str(tmp_path / "d")]
    for bad, message in [
        ("3/2", "'3/2': need 0 <= RANK < WORLD"),
        ("2/2", "need 0 <= RANK < WORLD"),
        ("-1/2", "'-1/2': need 0 <= RANK < WORLD"),
        ("a/b", "'a/b': expected RANK/WORLD (such as 0/4) or env"),
        ("1", "expected RANK/WORLD"),
        ("0/0", "need 0 <= RANK < WORLD"),
    ]:
        err = _usage_error([*out, f"--part={bad}"], capsys)
        assert "rank1fast collect: error: argument --part: " in err and message in err
    err = _usage_error([*out, "--part", "env"], capsys)
    assert "neither RANK and WORLD_SIZE (torchrun) nor SLURM_PROCID and SLURM_NTASKS" in err
    no_part_env.setenv("RANK", "0")  # half of torchrun's pair is not enough
    assert "neither RANK" in _usage_error([*out, "--part", "env"], capsys)
    no_part_env.setenv("WORLD_SIZE", "two")
    assert "RANK='0', WORLD_SIZE='two': expected integers" in _usage_error(
        [*out, "--part", "env"], capsys
    )

    stats = ["collect", "--sites", CSITES, "--statistics", str(tmp_path / "r.npz")]
    err = _usage_error([*stats, "--part", "0/2"], capsys)
    assert "argument --part: not allowed with argument --statistics" in err
    err = _usage_error([*stats, "--workers", "2"], capsys)
    assert "argument --workers: not allowed with argument --statistics" in err
    err = _usage_error([*out, "--part", "0/2", "--workers", "2"], capsys)
    assert "argument --workers: not allowed with argument --part" in err
    assert "one of the arguments --out --statistics" in _usage_error(
        ["collect", "--sites", CSITES, "--part", "0/2"], capsys
    )
    assert "argument --ray: only with --workers N" in _usage_error([*out, "--ray"], capsys)
    err = _usage_error([*out, "--part", "0/2", "--gpus-per-worker", "1"], capsys)
    assert "argument --gpus-per-worker: only with --workers N" in err
    assert "must be at least 1" in _usage_error([*out, "--workers", "0"], capsys)
    assert "must be at least 1" in _usage_error(["join", str(tmp_path), "--world", "0"], capsys)
    assert not (tmp_path / "d").exists()

    assert main(["join", str(tmp_path / "nothing")]) == 1
    assert "no such directory" in capsys.readouterr().err
    assert main(["join", str(tmp_path)]) == 1
    assert "holds no part" in capsys.readouterr().err


def test_part_env_from_slurm_and_local_rank_device(no_part_env) -> None:
    import torch
    from rank1fast.cli import _part_arg, _worker_device

    no_part_env.setenv("SLURM_PROCID", "3")
    no_part_env.setenv("SLURM_NTASKS", "8")
    assert _part_arg("env") == (3, 8)
    assert _part_arg("5/8") == (5, 8)

    no_part_env.setattr(torch.cuda, "is_available", lambda: True)
    no_part_env.setattr(torch.cuda, "device_count", lambda: 4)
    assert _worker_device("auto") == "auto"  # no local rank
    no_part_env.setenv("SLURM_LOCALID", "2")
    assert _worker_device("auto") == "cuda:2"
    no_part_env.setenv("LOCAL_RANK", "1")  # torchrun's comes first
    assert _worker_device("auto") == "cuda:1"
    assert _worker_device("cpu") == "cpu"
    no_part_env.setenv("LOCAL_RANK", "5")  # one GPU per process (CUDA_VISIBLE_DEVICES)
    assert _worker_device("auto") == "auto"
    no_part_env.setattr(torch.cuda, "is_available", lambda: False)
    no_part_env.setenv("LOCAL_RANK", "1")
    assert _worker_device("auto") == "auto"


def test_cli_collect_with_ray_workers(cluster, tiny_llama_dir, corpus, tmp_path, capsys):
    # In-process, the command uses the module's running Ray session (no new cluster).
    one = rank1fast.collect(
        str(tiny_llama_dir),
        str(corpus),
        CSITES,
        tmp_path / "one",
        max_tokens=222,
        device="cpu",
        progress=False,
        **COLLECT,
    )
    out = tmp_path / "many"
    argv = ["collect", str(tiny_llama_dir), "--corpus", str(corpus), *CLI_COLLECT]
    argv += ["--out", str(out), "--workers", "2", "--ray", "--cpus-per-worker", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "222 tokens" in printed and "by 2 workers" in printed
    assert_same_collection(one, rank1fast.Dump.open(out))


def test_cli_workers_without_ray(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    argv = ["collect", "--sites", CSITES, "--out", str(tmp_path / "d"), "--workers", "2"]
    assert main(argv) == 1
    assert "pip install 'rank1fast[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
