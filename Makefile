# stslock — see README.md. Targets mirror the Go operator's where they exist.
SHELL := /usr/bin/env bash
VENV  ?= .venv
PY    := $(VENV)/bin/python

.PHONY: help test test-e2e fmt lint ci kubesim fleet load python-deps manifests install uninstall deploy undeploy run dev build-installer

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

fleet: ## Fleet run: 1000 locks, 3 replicas, replica kills and writer failures, 60 s.
	cargo run -p fleet --release -- --locks 1000 --replicas 3 --kill-every 10 --flap-every-ms 500 --seconds 60

load: ## Measure kubesim throughput (64 clients, 8 watches).
	cargo run -p kubesim --release --bin kubesim-load -- --clients 64 --watches 8 --seconds 10

# --- The Go operator's targets, same meaning -------------------------------------------
IMG ?= ghcr.io/stslock/stslock:0.1.0
KUBECTL ?= kubectl

manifests: ## Regenerate the CRD from the Rust types and dist/install.yaml.
	cargo run -q -- crd > deploy/crd/app.anukkrit.me_statefulsetlocks.yaml
	$(MAKE) build-installer

build-installer: ## Build dist/install.yaml (CRD, RBAC, operator) with kustomize.
	@mkdir -p dist
	$(KUBECTL) kustomize deploy/default | sed 's|image: ghcr.io/stslock/stslock:.*|image: $(IMG)|' > dist/install.yaml

install: ## Install the CRD into the cluster of the current kubeconfig.
	$(KUBECTL) apply -f deploy/crd/app.anukkrit.me_statefulsetlocks.yaml

uninstall: ## Remove the CRD (and with it every StatefulSetLock).
	$(KUBECTL) delete --ignore-not-found -f deploy/crd/app.anukkrit.me_statefulsetlocks.yaml

deploy: ## Deploy the operator (IMG=...) to the cluster of the current kubeconfig.
	$(KUBECTL) kustomize deploy/default | sed 's|image: ghcr.io/stslock/stslock:.*|image: $(IMG)|' | $(KUBECTL) apply -f -

undeploy: ## Remove the operator.
	$(KUBECTL) kustomize deploy/default | $(KUBECTL) delete --ignore-not-found -f -

run: ## Run the operator locally against the current kubeconfig.
	cargo run --release -- run

dev: ## kubesim + the operator + the seed's samples, kubeconfig in ./stslock-dev.kubeconfig.
	cargo run --release -- dev

test-e2e: ## End-to-end: kubectl 1.32 drives CRD install, samples, failover and describe (against kubesim over loopback).
	cargo test -p stslock --test kubectl_story --test operator
