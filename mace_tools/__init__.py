"""mace-tools: container-corrected latency measurement with eBPF."""

__version__ = "0.1.0"
