# stslock — see README.md. Targets mirror the Go operator's where they exist.
SHELL := /usr/bin/env bash
VENV  ?= .venv
PY    := $(VENV)/bin/python

.PHONY: help test fmt lint ci kubesim load python-deps

help: ## List targets.
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

python-deps: $(PY) ## Python client used by the compatibility tests (installed into .venv).

$(PY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check kubernetes

test: python-deps ## Run every test (unit, kubesim, kubectl and Python client compatibility).
	KUBESIM_PYTHON=$(abspath $(PY)) cargo test --workspace

fmt: ## Format the code.
	cargo fmt --all

lint: ## Clippy with warnings as errors.
	cargo clippy --workspace --all-targets -- -D warnings

ci: ## What CI runs.
	./.ci/run

kubesim: ## Run kubesim on a free loopback port, kubeconfig in ./kubesim.kubeconfig.
	cargo run -p kubesim --release -- --kubeconfig ./kubesim.kubeconfig

load: ## Measure kubesim throughput (64 clients, 8 watches).
	cargo run -p kubesim --release --bin kubesim-load -- --clients 64 --watches 8 --seconds 10
