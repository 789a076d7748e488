# mace-ping and mace-traceroute in a container image (see README, "Measuring a container").
#
#   make image                      builds everything offline: the wheels (with the BPF object)
#                                   and a Debian base made by debootstrap; nothing is pulled
#   make image BASE=debian:bookworm-slim
#                                   the same on a registry base; python3 and libbpf1 are then
#                                   installed from Debian while building
#
# Run it with the least privilege that works (no --privileged, no setns):
#   docker run --rm --cap-drop ALL --cap-add BPF --cap-add PERFMON --cap-add NET_RAW \
#       --security-opt seccomp=unconfined mace-tools -c 10 HOST
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# Only the runtime: Python and the system libbpf (no compiler, no kernel headers).
RUN if ! python3 -c 'import venv, ctypes; ctypes.CDLL("libbpf.so.1")' 2>/dev/null; then \
        apt-get update && \
        apt-get install -y --no-install-recommends python3 python3-venv libbpf1 && \
        rm -rf /var/lib/apt/lists/*; \
    fi

# Wheels built on the host by `make wheels` (mace-tools carries its compiled BPF object).
COPY build/image/wheels /tmp/wheels
RUN python3 -m venv /opt/mace && \
    /opt/mace/bin/pip install -q --no-index --no-cache-dir --find-links /tmp/wheels mace-tools && \
    rm -rf /tmp/wheels

ENV PATH=/opt/mace/bin:$PATH
ENTRYPOINT ["mace-ping"]
CMD ["--help"]
