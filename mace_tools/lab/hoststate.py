"""What container engines change in the root network namespace: snapshot, restore, compare.

Docker and Podman (netavark) program the firewall through the `iptables` command, which is
iptables-nft or iptables-legacy depending on the machine, add a bridge and turn on
forwarding. Every iptables backend present is covered, each saved and restored with its own
iptables-save/-restore. nft is used only for tables iptables does not own, and to delete
tables that did not exist: restoring an iptables-nft table from `nft list` output is lossy
(nft prints translations of the xtables matches and targets and reads them back as native
expressions), after which iptables-nft calls the table incompatible and the next engine
fails with "iptables: Chain already exists". Measured here with a dockerd started by hand.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

IPTABLES_BACKENDS = ("iptables-nft", "ip6tables-nft", "iptables-legacy", "ip6tables-legacy")
_NFT_FAMILY = {"iptables-nft": "ip", "ip6tables-nft": "ip6"}
# Written in this order on restore: ip_forward also resets the IPv4 per-device forwarding
# (and accept_redirects) that writing it to 1 changed.
SYSCTLS = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding",
           "net/ipv6/conf/default/forwarding")
_BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
_COUNTERS = re.compile(r"\[\d+:\d+\]")


def _run(*cmd: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)


def _iptables_save(backend: str) -> str | None:
    """Rules as iptables-restore reads them, without comments and counters (which change
    with traffic); None if this backend is missing or unusable here."""
    if shutil.which(f"{backend}-save") is None:
        return None
    proc = _run(f"{backend}-save")
    if proc.returncode != 0:
        return None
    lines = [_COUNTERS.sub("[0:0]", line) for line in proc.stdout.splitlines()
             if line and not line.startswith("#")]
    return "".join(block for block in _table_blocks(lines) if block != _empty_table(
        block[1:block.index("\n")]))


def _table_blocks(lines: list[str]) -> list[str]:
    """Save output cut into one text per table ("*name" ... "COMMIT")."""
    blocks: list[str] = []
    for line in lines:
        if line.startswith("*") or not blocks:
            blocks.append("")
        blocks[-1] += f"{line}\n"
    return blocks


def _tables(save: str) -> list[str]:
    return [line[1:] for line in save.splitlines() if line.startswith("*")]


def _nft_tables() -> list[str]:
    """'family name' of every nft table ([] without nft)."""
    if shutil.which("nft") is None:
        return []
    proc = _run("nft", "list", "tables")
    return [line.split(None, 1)[1] for line in proc.stdout.splitlines()
            if line.startswith("table ")]


def _nft_listing(table: str) -> str:
    return _run("nft", "-s", "list", "table", *table.split()).stdout


@dataclass(frozen=True)
class HostState:
    iptables: dict[str, str]  # backend -> normalized save text
    nft: dict[str, str]  # "family name" -> listing; "" for tables iptables-nft owns
    links: frozenset[str]
    sysctls: dict[str, str]

    def differences(self, now: HostState) -> list[str]:
        """What changed from self to now, one line per item (empty if nothing did)."""
        out = [f"link {name} {'added' if name in now.links else 'removed'}"
               for name in sorted(self.links ^ now.links)]
        for key in SYSCTLS:
            if self.sysctls.get(key) != now.sysctls.get(key):
                out.append(f"{key}: {self.sysctls.get(key)} -> {now.sysctls.get(key)}")
        for backend in sorted(self.iptables.keys() | now.iptables.keys()):
            was, is_ = self.iptables.get(backend, ""), now.iptables.get(backend, "")
            if was != is_:
                changed = [line for line in difflib.unified_diff(
                    was.splitlines(), is_.splitlines(), lineterm="", n=0)
                    if line[:1] in "+-" and line[:3] not in ("+++", "---")]
                out.append(f"{backend}: {' | '.join(changed[:6])}"
                           f"{' ...' if len(changed) > 6 else ''}")
        for table in sorted(self.nft.keys() | now.nft.keys()):
            if table not in now.nft or table not in self.nft:
                out.append(f"nft table {table} {'added' if table in now.nft else 'removed'}")
            elif self.nft[table] != now.nft[table]:
                out.append(f"nft table {table} changed")
        return out


def to_json(state: HostState) -> str:
    return json.dumps({"iptables": state.iptables, "nft": state.nft,
                       "links": sorted(state.links), "sysctls": state.sysctls})


def from_json(text: str) -> HostState:
    raw = json.loads(text)
    return HostState(raw["iptables"], raw["nft"], frozenset(raw["links"]), raw["sysctls"])


def snapshot() -> HostState:
    saves = {b: s for b in IPTABLES_BACKENDS if (s := _iptables_save(b)) is not None}
    owned = {f"{family} {table}" for backend, family in _NFT_FAMILY.items()
             for table in _tables(saves.get(backend, ""))}
    nft = {t: "" if t in owned else _nft_listing(t) for t in _nft_tables()}
    sysctls = {key: Path("/proc/sys", key).read_text().strip() for key in SYSCTLS
               if Path("/proc/sys", key).exists()}
    return HostState(saves, nft, frozenset(p.name for p in Path("/sys/class/net").iterdir()),
                     sysctls)


def _empty_table(table: str) -> str:
    """iptables-restore input that empties a table and accepts in its built-in chains:
    what a table that does not exist amounts to (a legacy one cannot be unloaded), so the
    save text leaves such tables out."""
    chains = "".join(f":{c} ACCEPT [0:0]\n" for c in _BUILTIN_CHAINS.get(table, ()))
    return f"*{table}\n{chains}COMMIT\n"


def restore(before: HostState, bridges: tuple[str, ...]) -> list[str]:
    """Put back what snapshot() saw; delete the named bridges if they did not exist.
    Returns what still differs afterwards (empty on success), of links only the named
    bridges and veths (an engine's containers' ends): other links come and go beside an
    engine (a test's own veth to its target)."""
    for bridge in bridges:
        if bridge not in before.links:
            _run("ip", "link", "del", bridge)
    for table in set(_nft_tables()) - before.nft.keys():  # engines' new tables, any backend
        _run("nft", "delete", "table", *table.split())
    for backend, saved in before.iptables.items():
        now = _iptables_save(backend)
        if now is not None and now != saved:
            extra = [t for t in _tables(now) if t not in _tables(saved)]
            _run(f"{backend}-restore", stdin=saved + "".join(map(_empty_table, extra)))
    for table, listing in before.nft.items():
        if listing and _nft_listing(table) != listing:  # a table nft itself owns
            _run("nft", "-f", "-", stdin=f"add table {table}\ndelete table {table}\n{listing}")
    for key, value in before.sysctls.items():
        path = Path("/proc/sys", key)
        if path.read_text().strip() != value:
            path.write_text(value)
    return [line for line in before.differences(snapshot())
            if not line.startswith("link ") or line.split()[1].startswith((*bridges, "veth"))]


def remove_stale(prefixes: tuple[str, ...], links: tuple[str, ...]) -> list[str]:
    """Delete chains named with one of prefixes, the rules that jump to them or name one of
    links, and those links: what an engine that is not running any more left behind (a
    crashed run, or a daemon started by hand and stopped). Returns what was removed."""
    removed = [f"link {name}" for name in links if Path(f"/sys/class/net/{name}").exists()]
    for name in links:
        _run("ip", "link", "del", name)
    words = prefixes + links
    for family in ("ip", "ip6"):
        removed += _remove_stale_nft(family, words, prefixes)
    for backend in ("iptables-legacy", "ip6tables-legacy"):
        removed += _remove_stale_legacy(backend, words, prefixes)
    return removed


def _mentions(text: str, words: tuple[str, ...]) -> bool:
    return any(f'"{w}' in text for w in words)  # a JSON string starting with the word


def _remove_stale_nft(family: str, words: tuple[str, ...], prefixes: tuple[str, ...],
                      ) -> list[str]:
    """Through nft by handle, in one transaction: this works whether or not iptables-nft
    still finds the table compatible (after a lossy restore it does not)."""
    if shutil.which("nft") is None:
        return []
    proc = _run("nft", "-j", "list", "ruleset", family)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    items = json.loads(proc.stdout).get("nftables", [])
    chains = [c["chain"] for c in items if "chain" in c
              and c["chain"]["name"].startswith(prefixes)]
    ours = {(c["table"], c["name"]) for c in chains}
    rules = [r["rule"] for r in items if "rule" in r
             and (r["rule"]["table"], r["rule"]["chain"]) not in ours
             and _mentions(json.dumps(r["rule"]["expr"]), words)]
    if not chains and not rules:
        return []
    script = [f"delete rule {family} {r['table']} {r['chain']} handle {r['handle']}"
              for r in rules]
    script += [f"flush chain {family} {c['table']} {c['name']}" for c in chains]
    script += [f"delete chain {family} {c['table']} {c['name']}" for c in chains]
    _run("nft", "-f", "-", stdin="\n".join(script) + "\n")
    return [f"{family} {c['table']} chain {c['name']}" for c in chains] + \
        [f"{family} {r['table']} rule in {r['chain']}" for r in rules]


def _remove_stale_legacy(backend: str, words: tuple[str, ...], prefixes: tuple[str, ...],
                         ) -> list[str]:
    saved = _iptables_save(backend)
    if not saved:
        return []
    kept, removed = [], []
    for line in saved.splitlines():
        chain = line.startswith(":") and line[1:].startswith(prefixes)
        rule = line.startswith("-A ") and any(t.startswith(words) for t in line.split())
        (removed if chain or rule else kept).append(line)
    if removed:
        _run(f"{backend}-restore", stdin="\n".join(kept) + "\n")
    return [f"{backend}: {line}" for line in removed]
