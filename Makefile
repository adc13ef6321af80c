# The two front-door commands: `make run` and `make test`. See README.md.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Tests and local runs never ask the EC2 instance-metadata service for anything.
export AWS_EC2_METADATA_DISABLED := true

VENV := .venv
BINARY := target/debug/password-recovery

.PHONY: help run test build lint tools bench symbol-order redis-cli valgrind perf

help:
	@echo "make run    start the service on localhost:50051 in front of a local Cognito emulator"
	@echo "make test   formatting, clippy, and every test"
	@echo "make build  release build (target/release/password-recovery)"
	@echo "make bench  memory, throughput, instructions and system calls per call of the release binary under a bounded loopback load"
	@echo "make symbol-order  renew link/symbol-order.txt (after a toolchain or dependency change)"

build:
	cargo build --release --locked

# Project-local tools: moto and grpcurl in .venv, buf in node_modules.
$(VENV)/.installed: requirements-dev.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

# redis-cli (Debian's redis-tools) joins the tests' Redis Cluster; apt as root, else sudo -n.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
redis-cli:
	@command -v redis-cli >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-tools; } || \
		{ echo "redis-cli is needed: install Debian's redis-tools (or your system's redis-cli)"; exit 1; }

# promtool checks and unit-tests the shipped alerts: taken alone from Debian's prometheus
# package into .venv/bin (nothing else of the package installed, no server started).
$(VENV)/bin/promtool: | $(VENV)/.installed
	@cd $(VENV) && rm -f prometheus_*.deb && { apt-get download -qq prometheus 2>/dev/null || \
		{ $(SUDO) apt-get update -qq && apt-get download -qq prometheus; }; } && \
		dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > bin/promtool && \
		chmod +x bin/promtool && rm -f prometheus_*.deb || \
		{ rm -f bin/promtool; echo "promtool is needed: Debian's prometheus package ships it"; exit 1; }

tools: $(VENV)/.installed node_modules/.installed redis-cli $(VENV)/bin/promtool

# valgrind (callgrind) counts the benchmark's instructions per call.
valgrind:
	@command -v valgrind >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; } || \
		{ echo "valgrind is needed for make bench and make symbol-order: install Debian's valgrind"; exit 1; }

# perf (Debian's linux-perf) counts the benchmark's system calls per call.
perf:
	@command -v perf >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf; } || \
		{ echo "perf is needed for make bench: install Debian's linux-perf"; exit 1; }

# The bench measures the shipped build, copied aside: cargo builds the binary anew for a bench,
# with the dev-dependencies' features, which renames its functions (see build.rs).
bench: $(VENV)/.installed valgrind perf
	cargo build --release --locked
	cp -f target/release/password-recovery target/release/password-recovery-shipped
	BENCH_BINARY=target/release/password-recovery-shipped cargo bench --locked --bench load

# Renews link/symbol-order.txt, the functions the linker lays out side by side, from runs of the
# shipped build under callgrind (and the Dockerfile's RUST_VERSION); then links the binary with it.
symbol-order: $(VENV)/.installed valgrind
	cargo build --release --locked
	$(VENV)/bin/python scripts/symbol_order.py --binary target/release/password-recovery
	cargo build --release --locked

run: $(VENV)/.installed
	cargo build --locked
	$(VENV)/bin/python scripts/dev_stack.py --binary $(BINARY)

# --all-features keeps the optional OTLP exporter (`otel`) built.
lint:
	cargo fmt --check
	cargo clippy --all-targets --locked -- -D warnings
	cargo clippy --all-targets --all-features --locked -- -D warnings

# The memory tests measure the release binary, so it is built first; the trace test runs the
# release binary built with `--features otel`, kept beside it as password-recovery-otel.
test: tools lint
	cargo build --release --locked --features otel
	cp -f target/release/password-recovery target/release/password-recovery-otel
	cargo build --release --locked
	AWS_REGION=us-east-1 cargo test --locked
