"""mace-tools benchmark: `python -m bench` (or `make bench`)."""
