# mace-tools: one entry point for set-up, demo, tests and bench on a fresh Debian machine.
# `make demo` and `make test` install whatever is missing first (apt packages, the Python
# venv, the BPF object), so they work on a new machine as root.

PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
BPF_OBJ  := mace_tools/kernel/mace.bpf.o
BPF_ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
APT_PKGS := clang llvm libbpf-dev libbpf1 iproute2 iptables tcpdump iputils-ping \
            docker.io busybox-static
BENCH_APT_PKGS := scamper bpftool python3-bpfcc time

.PHONY: setup deps venv build demo test lint bench clean

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

demo: setup
	$(BIN)/mace-lab demo

test: setup
	$(BIN)/ruff check mace_tools tests bench
	$(BIN)/python -m pytest -q

bench: EXTRA_APT = $(BENCH_APT_PKGS)
bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info $(BPF_OBJ)
