# authprobe: the newcomer's path is `make demo` (the operator on a local control plane) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
TOOLS_BIN := $(CURDIR)/.tools/bin

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

.PHONY: tools
tools: node-deps ## Build the control plane, node and promtool binaries into .tools/bin (only when missing); install the node's Debian packages and nginx
	tools/build.sh
	tools/ensure-nginx.sh

.PHONY: node-deps
node-deps: ## Install containerd, runc and the CNI plugins from Debian when missing (the node's runtime)
	tools/ensure-node.sh

.PHONY: node-test
node-test: tools static ## Only the node tests: pods on a real node in the run's own namespaces, the canary's among them (needs root)
	$(CARGO) test --locked -p authprobe-harness --test node --test node_cleanup
	$(CARGO) test --locked -p authprobe --test canary

.PHONY: crd
crd: ## Regenerate crds/authprobe.yaml and the chart's copy from the Rust types
	$(CARGO) run --quiet -- crd > crds/authprobe.yaml
	cp crds/authprobe.yaml charts/authprobe/files/authprobe.crd.yaml

.PHONY: lint
lint: ## rustfmt and clippy, as the tests run them
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

.PHONY: audit
audit: ## Dependency licences, bans and sources (cargo-deny; advisories when the database is reachable)
	tools/audit.sh

.PHONY: test
test: tools static lint audit ## Format, lint, audit dependencies and run every test against a real local control plane
	$(CARGO) test --workspace --locked

NODE ?=

.PHONY: cluster
cluster: ## Run the local control plane until Ctrl-C (NODE=1: with a node that runs pods); prints `export KUBECONFIG=...`
	@tools/build.sh
	@$(if $(NODE),tools/ensure-node.sh,true)
	@$(CARGO) run --quiet --locked -p authprobe-harness --bin local-cluster -- $(if $(NODE),--node)

.PHONY: demo
demo: ## The operator on a local control plane against a fake Google: a broken mapping and a workload loading a key file, their fixes, Ready
	tools/demo.sh

MUSL := x86_64-unknown-linux-musl

.PHONY: static
static: ## Build the static (musl) release binary the image ships
	tools/ensure-musl.sh
	$(CARGO) build --locked --release --target $(MUSL) --bin authprobe

.PHONY: static-mimalloc
static-mimalloc: ## The static binary with mimalloc as its allocator (cargo feature mimalloc), in target/mimalloc
	tools/ensure-musl.sh
	$(CARGO) build --locked --release --target $(MUSL) --features mimalloc --bin authprobe --target-dir target/mimalloc

# `make bench MIMALLOC=1` also measures the static binary with mimalloc at 10k × 3, without and
# with the Deployments.
MIMALLOC ?=

.PHONY: bench
bench: tools ## Benchmarks at 1,000 and 10,000 namespaces (with one Deployment per KSA, the musl binary, and the live chain over an hour) next to a naive checker (75 min to 2 h; not part of make test)
	command -v jq >/dev/null || tools/apt-install.sh jq
	$(CARGO) build --locked --release -p authprobe --bin authprobe
	$(CARGO) build --locked --release -p authprobe-bench
	$(MAKE) static
	$(if $(MIMALLOC),$(MAKE) static-mimalloc)
	MIMALLOC=$(MIMALLOC) bench/make-bench.sh

FUZZ_SECONDS ?= 60
FUZZ_TARGETS := annotation principal resource_name google_response attribute_mapping

.PHONY: fuzz
fuzz: ## Fuzz the parsers and Google response decoding, FUZZ_SECONDS per target (not part of make test)
	rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	for target in $(FUZZ_TARGETS); do \
	  cargo +nightly fuzz run $$target -- -max_total_time=$(FUZZ_SECONDS) -max_len=4096 || exit 1; \
	done
