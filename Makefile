# Strata: `make demo` and `make test` do all the set-up they need on a fresh Debian-like
# machine with the Rust toolchain (system packages are installed when missing).

SHELL := /bin/bash
CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
# loom models build with --cfg loom, in their own target dir so nothing else rebuilds.
LOOM_TARGET_DIR := $(TARGET_DIR)/loom

.PHONY: deps deps-build build test test-rust test-loom demo release clean

# Everything the tests need (system packages, a broker, Python packages).
deps:
	@.ci/install-deps test

# Only what building needs (the demo needs nothing else).
deps-build:
	@.ci/install-deps build

build: deps-build
	$(CARGO) build --workspace --all-targets --locked

release: deps-build
	$(CARGO) build --release --locked --bin strata

# The whole test suite: build (timed), every Rust test (timed), the loom models (timed).
test: deps
	@if $(CARGO) fmt --version >/dev/null 2>&1; then \
		$(CARGO) fmt --all -- --check || { echo "test: code is not formatted (rustfmt.toml); run cargo fmt --all"; exit 1; }; \
	else echo "test: rustfmt is not installed; formatting not checked"; fi
	@t0=$$(date +%s); \
	$(CARGO) build --workspace --all-targets --locked || exit 1; \
	t1=$$(date +%s); echo "test: build took $$((t1 - t0)) s"; \
	$(CARGO) test --workspace --locked --no-fail-fast || exit 1; \
	t2=$$(date +%s); echo "test: tests took $$((t2 - t1)) s"; \
	$(MAKE) --no-print-directory test-loom || exit 1; \
	t3=$$(date +%s); echo "test: loom models took $$((t3 - t2)) s"; \
	echo "test: all passed in $$((t3 - t0)) s"

test-loom:
	RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 $(CARGO) test --locked -p strata-sync --release --target-dir $(LOOM_TARGET_DIR)

# The demo: three nodes on this machine through a fault schedule (README, first screen).
demo: release
	$(TARGET_DIR)/release/strata demo

clean:
	$(CARGO) clean
