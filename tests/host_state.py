"""Undo what a container engine does to the root namespace when a test starts one.

dockerd and netavark add a bridge, NAT and filter rules, and turn on IPv4 forwarding, as they
do for users; when a test starts the engine itself, it takes all of that away again
afterwards: the firewall ruleset and ip_forward are restored from a snapshot and bridges
that were not there before are deleted.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def _nft_ruleset() -> str | None:
    """The whole ruleset (iptables-nft rules included), or None where nft is missing."""
    if shutil.which("nft") is None:
        return None
    proc = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def _iptables_save() -> str:
    return subprocess.run(["iptables-save"], capture_output=True, text=True).stdout


@contextmanager
def restored_afterwards(bridges: tuple[str, ...]) -> Iterator[None]:
    ruleset = _nft_ruleset()
    legacy = _iptables_save() if ruleset is None else ""
    forward = IP_FORWARD.read_text()
    absent = [b for b in bridges if not Path(f"/sys/class/net/{b}").exists()]
    try:
        yield
    finally:
        for bridge in absent:
            subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        if ruleset is not None:
            subprocess.run(["nft", "-f", "-"], input=f"flush ruleset\n{ruleset}", text=True,
                           capture_output=True)
        else:
            subprocess.run(["iptables-restore"], input=legacy, text=True, capture_output=True)
        IP_FORWARD.write_text(forward)
