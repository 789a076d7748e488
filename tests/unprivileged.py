"""Run a command as root with only some capabilities (or none): the privilege cases.

Staying uid 0 (instead of switching to nobody) keeps the checkout readable wherever it was
cloned; the bounding set decides what execve grants.
"""

# mace-ping's least privilege in its own netns (what the README's container recipe names)
LEAST_PRIVILEGE = ("bpf", "perfmon", "net_raw")


def with_capabilities(*caps: str) -> list[str]:
    bounding = ",".join(["-all", *(f"+{cap}" for cap in caps)])
    return ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--"]


WITHOUT_CAPABILITIES = with_capabilities()
