# stslock — see README.md. Targets mirror the Go operator's where they exist.
SHELL := /usr/bin/env bash
VENV  ?= .venv
PY    := $(VENV)/bin/python

.PHONY: help test promtool-test helm-lint docker-build docker-push image-deps test-e2e fmt lint ci kubesim fleet load python-deps browser-deps soak manifests install uninstall deploy undeploy run dev build-installer control-plane test-real test-real-suites

help: ## List targets.
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

python-deps: $(PY) ## Python client used by the compatibility tests (installed into .venv).

$(PY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check kubernetes

browser-deps: ## Headless Chromium for the report's screenshot test (Debian's chromium package).
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null || \
		  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; }

# The integration suites ported to tests/common: they run on kubesim (in `cargo test`) and on
# the real control plane (STSLOCK_TEST_BACKEND=real; STSLOCK_TEST_KUBECONFIG=<path> for any cluster).
REAL_SUITES := --test operator --test api_faults --test kubectl_story --test kubectl_plugin --test scope --test takeover --test migration --test sharding --test metrics --test telemetry
# The part of them `make test` runs on the real control plane too (the rest: make test-real).
REAL_IN_TEST := --test kubectl_story --test kubectl_plugin --test takeover --test migration

test: python-deps browser-deps image-deps ## Run every test on kubesim (with the CI-sized chaos soak), plus the conformance suite, the RBAC test and the kubectl, takeover and migration suites on the real control plane (all ported suites on it: make test-real).
	@# The real control plane is built (or found in the cache) once, before tests that need it run side by side.
	loadtest/controlplane/build.sh
	loadtest/tools/tool.sh promtool
	loadtest/tools/tool.sh helm
	loadtest/otelcol/build.sh
	KUBESIM_PYTHON=$(abspath $(PY)) cargo test --workspace
	STSLOCK_TEST_BACKEND=real cargo test -p stslock $(REAL_IN_TEST)

promtool-test: ## Check the alert rules and run their unit tests (deploy/observability/rules.test.yaml) with Prometheus's promtool (built from the Go module proxy, cached).
	PROMTOOL=$$(loadtest/tools/tool.sh promtool) cargo test -p stslock --test promtool

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

# The chaos soak (P9): every fault `fleet --scenario faults` has, replica kills and graceful
# restarts, writer flaps, scale events and node loss; judged from kubesim's commits.
SOAK_SECONDS ?= 2000
soak: ## Chaos soak on kubesim (~35 min at the default length, 2,000 s of faults): ≥1,000 replica kills, ≥10,000 writer failures; report in soak-report.{json,html}.
	cargo run -p fleet --release -- --scenario faults --replicas 6 --locks 500 --seconds $(SOAK_SECONDS) \
		--kill-every-ms 1100 --graceful-share 0.15 --flap-every-ms 150 --scale-every-ms 2000 \
		--node-loss-every-ms 60000 --json-out soak-report.json --html-out soak-report.html

control-plane: ## Real kube-apiserver 1.34, controller manager, etcd on loopback; prints how to use kubectl.1.33 (Ctrl-C stops).
	cargo run -q -p controlplane -- up --operator-rbac deploy/rbac

test-real: ## Only the real-backend part: the launcher's tests, then the ported suites on the real control plane (first run builds kube-apiserver and etcd: long).
	loadtest/controlplane/build.sh
	cargo test -p controlplane -- --nocapture
	@$(MAKE) --no-print-directory test-real-suites

test-real-suites: ## The ported integration suites on the real control plane (one per test binary), with their wall time.
	@start=$$(date +%s); rc=0; \
	STSLOCK_TEST_BACKEND=real cargo test -p stslock --no-fail-fast $(REAL_SUITES) || rc=$$?; \
	echo "== real-backend suites ($(REAL_SUITES)): $$(( $$(date +%s) - start )) s wall"; exit $$rc

load: ## Measure kubesim throughput (64 clients, 8 watches).
	cargo run -p kubesim --release --bin kubesim-load -- --clients 64 --watches 8 --seconds 10

# --- The Go operator's targets, same meaning -------------------------------------------
IMG ?= ghcr.io/stslock/stslock:0.1.0
KUBECTL ?= kubectl

helm-lint: ## Lint and render the Helm chart (deploy/helm/stslock) with helm (built from the Go module proxy, cached).
	HELM=$$(loadtest/tools/tool.sh helm) && $$HELM lint deploy/helm/stslock && $$HELM template stslock deploy/helm/stslock --include-crds > /dev/null

docker-build: ## Build the operator image IMG (docker if a daemon answers, else buildah); OCI_ARCHIVE=path also saves it as an OCI archive.
	deploy/image/build.sh "$(IMG)" $(if $(OCI_ARCHIVE),--oci-archive $(OCI_ARCHIVE))

docker-push: ## Push the image IMG (docker, else buildah).
	@if command -v docker >/dev/null && docker info >/dev/null 2>&1; then docker push $(IMG); \
	else STORAGE_DRIVER=vfs buildah push $(IMG) docker://$(IMG); fi

image-deps: ## buildah, to build images without a Docker daemon (Debian's package). A docker client with no daemon behind it does not count.
	@docker info >/dev/null 2>&1 || command -v buildah >/dev/null || \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q buildah >/dev/null || \
		  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q buildah >/dev/null; }; }

manifests: ## Regenerate the CRD from the Rust types and dist/install.yaml.
	cargo run -q -- crd > deploy/crd/app.anukkrit.me_statefulsetlocks.yaml
	cp deploy/crd/app.anukkrit.me_statefulsetlocks.yaml deploy/helm/stslock/crds/
	cp deploy/observability/prometheusrule.yaml deploy/observability/grafana-dashboard.json deploy/helm/stslock/files/
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

undeploy: ## Remove the operator (RBAC, StatefulSet); keeps the CRD and every lock (make uninstall removes those).
	$(KUBECTL) kustomize deploy/operator | $(KUBECTL) delete --ignore-not-found -f -

run: ## Run the operator locally against the current kubeconfig.
	cargo run --release -- run

dev: ## kubesim + the operator + the seed's samples, kubeconfig in ./stslock-dev.kubeconfig.
	cargo run --release -- dev

test-e2e: ## End-to-end: kubectl 1.32 drives CRD install, samples, failover and describe (against kubesim over loopback; STSLOCK_TEST_BACKEND=real for the real control plane).
	cargo test -p stslock --test kubectl_story --test operator
