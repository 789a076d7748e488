# mace-tools: one entry point for set-up, demo, tests and bench on a fresh Debian machine.
# `make demo` and `make test` install whatever is missing first (apt packages, the Python
# venv, the BPF object), so they work on a new machine as root.

PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
BPF_OBJ  := mace_tools/kernel/mace.bpf.o
BPF_ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
APT_PKGS := clang llvm libbpf-dev libbpf1 iproute2 iptables tcpdump iputils-ping \
            docker.io containerd podman busybox-static debootstrap prometheus
BENCH_APT_PKGS := scamper bpftool python3-bpfcc time

# The container image (Dockerfile): wheels from this checkout on a Debian base that
# debootstrap makes from Debian's archive, so no container registry is needed.
IMAGE        ?= mace-tools:latest
IMAGE_SUITE  := bookworm
DEBIAN_MIRROR ?= http://deb.debian.org/debian
IMAGE_DIR    := build/image
BASE_TAR     := $(IMAGE_DIR)/base-$(IMAGE_SUITE).tar
BASE         ?= mace-base:$(IMAGE_SUITE)
WHEELS       := $(IMAGE_DIR)/wheels/.built

.PHONY: setup deps venv build demo test lint bench bench-containers clean wheels image-inputs \
        image

setup: deps venv build

deps:
	@missing=$$(for p in $(APT_PKGS) $(EXTRA_APT); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

build: $(BPF_OBJ)

# CO-RE object: field offsets are relocated by libbpf against the running kernel's BTF at
# load time, so this builds without kernel headers and runs on other kernels with BTF.
$(BPF_OBJ): bpf/mace.bpf.c bpf/mace.h bpf/vmlinux_min.h
	clang -g -O2 -Wall -target bpf -D__TARGET_ARCH_$(BPF_ARCH) -Ibpf -c bpf/mace.bpf.c -o $@

wheels: $(WHEELS)

$(WHEELS): $(BPF_OBJ) pyproject.toml setup.py $(shell find mace_tools -name '*.py')
	rm -rf $(IMAGE_DIR)/wheels
	$(BIN)/pip wheel -q --no-cache-dir -w $(IMAGE_DIR)/wheels . 2>&1 | grep -v '^WARNING: Location' || true
	test -n "$$(ls $(IMAGE_DIR)/wheels/mace_tools-*.whl)"
	touch $@

# A minimal Debian with only the runtime (python3, libbpf1), trimmed of caches and docs.
$(BASE_TAR):
	rm -rf $(IMAGE_DIR)/rootfs && mkdir -p $(IMAGE_DIR)
	debootstrap --variant=minbase --include=python3,python3-venv,libbpf1 \
		$(IMAGE_SUITE) $(IMAGE_DIR)/rootfs $(DEBIAN_MIRROR) >$(IMAGE_DIR)/debootstrap.log
	cd $(IMAGE_DIR)/rootfs && rm -rf var/cache/apt/* var/lib/apt/lists/* usr/share/doc \
		usr/share/man usr/share/locale
	tar -C $(IMAGE_DIR)/rootfs -cf $@.tmp . && mv $@.tmp $@ && rm -rf $(IMAGE_DIR)/rootfs

image-inputs: $(WHEELS) $(BASE_TAR)

image: setup image-inputs
	@if [ "$(BASE)" = "mace-base:$(IMAGE_SUITE)" ] && ! docker image inspect $(BASE) >/dev/null 2>&1; \
		then docker import $(BASE_TAR) $(BASE); fi
	docker build -q --build-arg BASE=$(BASE) -t $(IMAGE) .

demo: setup
	$(BIN)/mace-lab demo

test: setup image-inputs
	$(BIN)/ruff check mace_tools tests bench
	$(BIN)/python -m pytest -q

bench: EXTRA_APT = $(BENCH_APT_PKGS)
bench: setup
	$(BIN)/python -m bench

# mace-ping in real Docker and Podman containers (engines started and undone by the bench)
bench-containers: setup image-inputs
	$(BIN)/python -m bench.containers

clean:
	rm -rf $(VENV) build *.egg-info $(BPF_OBJ)
