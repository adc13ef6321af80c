# The two front-door commands: `make run` and `make test`. See README.md.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Tests and local runs never ask the EC2 instance-metadata service for anything.
export AWS_EC2_METADATA_DISABLED := true

.PHONY: help run test build lint

help:
	@echo "make run    start the service (needs COGNITO_CLIENT_ID and AWS_REGION)"
	@echo "make test   formatting, clippy, and every test"
	@echo "make build  release build"

build:
	cargo build --release --locked

run:
	@if [ -z "$$COGNITO_CLIENT_ID" ] || [ -z "$${AWS_REGION:-}" ]; then \
		echo "make run: set COGNITO_CLIENT_ID and AWS_REGION (and AWS_ENDPOINT_URL for an emulator)," >&2; \
		echo "          e.g. COGNITO_CLIENT_ID=abc123 AWS_REGION=eu-west-1 make run" >&2; \
		exit 2; \
	fi
	cargo run --release --locked

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

lint:
	cargo fmt --check
	cargo clippy --all-targets --locked -- -D warnings

test: node_modules/.installed lint
	AWS_REGION=us-east-1 cargo test --locked
