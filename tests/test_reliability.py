"""Interruptions, concurrency and full disks: collect and write_adapter never leave half a file.

The kill -9 trials fork collections from one server process (which has loaded torch and the
model once) so that twenty real SIGKILLs at random moments cost seconds, not minutes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import rank1fast  # noqa: E402
from rank1fast import Dump, DumpError, Rank1IOError  # noqa: E402
from test_collect import assert_same_dump  # noqa: E402

SITE = "resid_post.2"
KW = dict(batch_size=2, max_length=40, shard_tokens=60, storage_dtype="float32")

SERVER = textwrap.dedent(
    """
    import os, sys, traceback
    import torch
    torch.set_num_threads(1)
    import transformers, rank1fast
    model_dir, corpus, kw, site = sys.argv[1], sys.argv[2], eval(sys.argv[3]), sys.argv[4]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    print("ready", flush=True)
    for line in sys.stdin:
        out = line.strip()
        if not out:
            break
        pid = os.fork()
        if pid == 0:
            try:
                rank1fast.collect((model, tok), corpus, site, out, device="cpu",
                                  progress=False, **kw)
                os._exit(0)
            except BaseException:
                traceback.print_exc()
                os._exit(3)
        print(pid, flush=True)
        print(os.waitpid(pid, 0)[1], flush=True)
    """
)


class Server:
    """A process that forks one collection per request; the test kills them."""

    def __init__(self, model_dir: Path, corpus: Path):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(model_dir), str(corpus), repr(KW), SITE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.line(120) == "ready"

    def line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the collect server said nothing for {timeout} s"
        return self.proc.stdout.readline().strip()

    def run(self, out: Path, kill_at: tuple[int, float] | None = None) -> int:
        """Collect into ``out``; returns the wait status.

        ``kill_at=(shards, delay)`` SIGKILLs the collection ``delay`` seconds after its
        manifest first lists ``shards`` shards. Kills placed by the dump's own progress land
        across the run however loaded the machine is (wall-clock kill times drawn from an
        earlier run's duration bunched up before the first shard on a busy CI machine).
        """
        self.proc.stdin.write(f"{out}\n")
        self.proc.stdin.flush()
        pid = int(self.line(60))
        if kill_at is not None:
            shards, delay = kill_at
            deadline = time.monotonic() + 120
            with contextlib.suppress(ProcessLookupError):
                while listed_shards(out) < shards and time.monotonic() < deadline:
                    os.kill(pid, 0)  # raises once the server has reaped a finished collection
                    time.sleep(0.002)
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)
        return int(self.line(120))

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def listed_shards(out: Path) -> int:
    """How many shards ``out``'s manifest lists now (0 before it exists or mid-replace)."""
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def server(tiny_llama_dir, prose, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("\n\n".join(prose) + "\n")
    s = Server(tiny_llama_dir, corpus)
    yield s
    s.close()


def assert_valid(out: Path) -> Dump:
    """What a reader sees mid-collection: a manifest whose shards are all complete."""
    dump = Dump.open(out)
    listed = sum(int(s["tokens"]) for s in dump.manifest["shards"])
    assert listed == dump.tokens
    if dump.tokens:
        stats = rank1fast.analyze(out, second_moments=False, progress=False)[SITE].stats
        assert stats.count + stats.skipped + stats.nonfinite == dump.tokens
    return dump


def test_twenty_kill9_then_resume_equals_uninterrupted(server, tmp_path):
    whole_dir = tmp_path / "whole"
    # The time one shard takes, from the faster of two uninterrupted runs (the first run in a
    # fresh server can take several times longer: caches, a loaded machine).
    durations = []
    for out in (whole_dir, tmp_path / "whole-again"):
        started = time.monotonic()
        assert server.run(out) == 0
        durations.append(time.monotonic() - started)
    whole = Dump.open(whole_dir)
    assert whole.complete and len(whole.shards) >= 20
    per_shard = min(durations) / len(whole.shards)

    rng = random.Random(1234)

    def kill_at() -> tuple[int, float]:
        """A random moment: after a random number of shards, within the next shard's time."""
        return rng.randrange(len(whole.shards)), rng.uniform(0.0, per_shard)

    killed, cut_at = 0, []
    for trial in range(20):
        out = tmp_path / f"killed-{trial}"
        status = server.run(out, kill_at=kill_at())
        killed += os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if (out / "manifest.json").exists():
            # A reader sees a valid dump whatever the moment (lock and temp files about).
            cut_at.append(assert_valid(out).tokens)
        if trial % 2:  # every other trial, the resume is killed too
            server.run(out, kill_at=kill_at())
        assert server.run(out) == 0  # the plain rerun resumes and completes
        resumed = Dump.open(out)
        assert_same_dump(resumed, whole)
        assert resumed.manifest["shards"] == whole.manifest["shards"]
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole_dir.iterdir())
    assert killed >= 15, f"only {killed} of 20 runs were killed before they finished"
    assert len(set(cut_at)) >= 8, f"the kills did not land across the run: {cut_at}"


def test_a_second_collection_into_the_same_dump_is_refused(
    server, tiny_llama, tokenizer, prose, tmp_path
):
    out = tmp_path / "busy"
    lock = out / "collect.lock"
    # The server's collection runs while this process tries to start another one.
    server.proc.stdin.write(f"{out}\n")
    server.proc.stdin.flush()
    pid = int(server.line(60))
    try:
        deadline = time.monotonic() + 60
        while not lock.exists() or not lock.read_text().strip():
            assert time.monotonic() < deadline, "the first collection never took its lock"
            time.sleep(0.005)
        with pytest.raises(DumpError, match=rf"another collection \(pid {pid}"):
            rank1fast.collect((tiny_llama, tokenizer), prose, SITE, out, progress=False, **KW)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        server.line(120)
    # The kernel dropped the killed holder's lock: the same call now resumes and finishes.
    dump = rank1fast.collect((tiny_llama, tokenizer), prose, SITE, out, progress=False, **KW)
    assert dump.complete and not lock.exists()


def test_lock_file_left_by_a_dead_process_does_not_block(tiny_llama, tokenizer, prose, tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    (out / "collect.lock").write_text("99999999\n")  # the file alone holds no lock
    dump = rank1fast.collect((tiny_llama, tokenizer), prose[:6], SITE, out, progress=False, **KW)
    assert dump.complete and not (out / "collect.lock").exists()


def test_analyze_ignores_unlisted_and_temporary_shards(tiny_llama, tokenizer, prose, tmp_path):
    out = tmp_path / "d"
    dump = rank1fast.collect((tiny_llama, tokenizer), prose[:8], SITE, out, progress=False, **KW)
    before = rank1fast.analyze(out, progress=False)[SITE].stats
    # As a collection in flight leaves them: a shard being written and one not yet listed.
    (out / "shard-00900.safetensors.tmp").write_bytes(b"\x00" * 100)
    (out / "shard-00901.safetensors").write_bytes((out / dump.shards[0].name).read_bytes())
    after = rank1fast.analyze(out, progress=False)[SITE].stats
    assert after.count == before.count and after.count + after.skipped == dump.tokens
    np.testing.assert_allclose(after.mean(), before.mean(), rtol=1e-12)  # merge order varies


# --------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (needs root; skipped elsewhere). Yields (mount point, resize(bytes))."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=False)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name)


def test_full_disk_during_collect_is_a_clean_error_then_resumes(
    small_disk, tiny_llama, tokenizer, prose, tmp_path
):
    mnt, resize = small_disk
    kw = dict(KW, shard_tokens=200)  # ~100 KiB shards of the 128-wide float32 site
    whole = rank1fast.collect(
        (tiny_llama, tokenizer), prose, SITE, tmp_path / "whole", progress=False, **kw
    )
    assert whole.manifest["tokens"] * 128 * 4 > 2**19  # twice the disk

    out = mnt / "dump"
    with pytest.raises(Rank1IOError, match="No space left"):
        rank1fast.collect((tiny_llama, tokenizer), prose, SITE, out, progress=False, **kw)
    assert leftovers(mnt) == []
    assert not (out / "collect.lock").exists()
    cut = assert_valid(out)  # a valid, shorter dump: every listed shard is whole
    assert 0 < cut.tokens < whole.tokens and not cut.complete

    resize(8 * 2**20)
    resumed = rank1fast.collect((tiny_llama, tokenizer), prose, SITE, out, progress=False, **kw)
    assert_same_dump(resumed, whole)


def test_full_disk_before_the_first_manifest_leaves_no_directory(
    small_disk, tiny_llama, tokenizer, prose
):
    mnt, _ = small_disk
    (mnt / "filler").write_bytes(b"\x00" * (2**18 - 4096))
    with contextlib.suppress(OSError):
        with open(mnt / "filler2", "wb") as f:  # take the last pages too
            f.write(b"\x00" * 8192)
    out = mnt / "dump"
    with pytest.raises((Rank1IOError, DumpError)):
        rank1fast.collect((tiny_llama, tokenizer), prose[:4], SITE, out, progress=False, **KW)
    assert not out.exists()


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    from synth import write_dump

    root = tmp_path_factory.mktemp("synth-dump")
    write_dump(root, {"resid_post.1": 32}, docs=[40] * 6, dtype="float32")
    report = rank1fast.analyze(root, progress=False)
    saved = report.save(tmp_path_factory.mktemp("report") / "report.npz")
    return report, saved


def big_vector(d_out: int = 4096) -> dict[str, np.ndarray]:
    return {"resid_post.1": np.random.default_rng(0).normal(size=d_out)}


def test_full_disk_during_write_adapter_leaves_nothing(small_disk, small_report):
    mnt, _ = small_disk
    out = mnt / "adapter"
    # lora_B of a rank-64 adapter into 4096 outputs is 1 MiB of float32: more than the disk.
    with pytest.raises(Rank1IOError, match="No space left"):
        rank1fast.write_adapter(small_report[0], big_vector(), out, rank=64)
    assert list(mnt.iterdir()) == []


def test_interrupted_write_adapter_leaves_nothing(monkeypatch, small_report, tmp_path):
    from rank1fast import _core

    real = _core.write_lora

    def interrupted(path, *args, **kwargs):
        real(path, *args, **kwargs)  # the weights are on disk, then Ctrl-C arrives
        raise KeyboardInterrupt

    monkeypatch.setattr(_core, "write_lora", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rank1fast.write_adapter(small_report[0], big_vector(64), tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_write_adapter_killed_at_random_moments_never_leaves_a_partial_adapter(
    small_report, tmp_path
):
    """kill -9 of a process writing adapters: each one exists whole, or not at all."""
    from safetensors.numpy import load_file

    script = textwrap.dedent(
        f"""
        import numpy as np, rank1fast
        report = rank1fast.Report.load({str(small_report[1])!r})
        vectors = {{"resid_post.1": np.random.default_rng(0).normal(size=4096)}}
        print("ready", flush=True)
        for i in range(10_000):
            rank1fast.write_adapter(report, vectors, {str(tmp_path)!r} + f"/a{{i}}", rank=16)
        """
    )
    rng = random.Random(7)
    written = 0
    for _ in range(5):
        for adapter in tmp_path.iterdir():
            shutil.rmtree(adapter)
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for adapter in tmp_path.glob("a*"):
            config = json.loads((adapter / "adapter_config.json").read_text())
            tensors = load_file(adapter / "adapter_model.safetensors")
            assert config["r"] == 16 and len(tensors) == 2
            assert (adapter / "rank1fast.json").is_file()
            written += 1
    assert written > 0, "no adapter was finished before the kills: nothing was checked"


# --------------------------------------------------------------------------- the docs table


def test_bad_inputs_table_is_current():
    """docs/bad-inputs.md is regenerated from real runs; this fails when the code drifted."""
    script = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.py"
    r = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_adapter_directory_is_readable_by_other_users(small_report, tmp_path):
    """Staged with mkdtemp (0700), the adapter must still get the usual umask permissions."""
    umask = os.umask(0o022)
    os.umask(umask)
    out = rank1fast.write_adapter(small_report[0], big_vector(64), tmp_path / "adapter")
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in out.iterdir():
        assert f.stat().st_mode & 0o444 == 0o444 & ~umask, f.name
