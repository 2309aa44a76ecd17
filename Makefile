# agora — every target installs what it needs into ~/.cache/agora first (a no-op once done).
SHELL := /bin/bash
ENV := . scripts/env.sh &&

.PHONY: all setup setup-test build demo test lint bench bench-trust clean

all: build

setup:
	@scripts/setup.sh

setup-test:
	@scripts/setup.sh --test

# The release binary, built in the shared build directory ($CARGO_TARGET_DIR, see scripts/env.sh);
# `target` links there so that target/release/agora exists.
build: setup
	@$(ENV) cargo build --release -p agora-cli
	@[ -e target ] || { $(ENV) ln -s "$$CARGO_TARGET_DIR" target; }

# The main job: a coordinator and 4 worker processes train the tiny model with DiLoCo over loopback, then
# the same token budget in one process for comparison (runs/demo; `agora demo --help` for options).
demo: build
	@$(ENV) "$$CARGO_TARGET_DIR/release/agora" demo

# Everything: formatting, lints, and every test (Rust and the Python compatibility checks they drive).
test: setup-test
	@$(ENV) cargo fmt --all -- --check
	@$(ENV) cargo clippy --workspace --all-targets -- -D warnings
	@$(ENV) cargo clippy --workspace --all-targets --features agora-cli/adversary -- -D warnings
	@$(ENV) cargo test --workspace --features agora-cli/adversary

bench: build setup-test
	bench/run.sh

# The adversarial suite (a separate build with the test-only misbehaving workers); appends to TRUST.md.
bench-trust: setup
	bench/trust.sh

clean:
	rm -rf target runs
