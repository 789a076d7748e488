"""Run a command as root with only some capabilities (or none): the privilege cases
(mace_tools.lab.agent.with_capabilities, which the bench uses too)."""

from mace_tools.lab.agent import with_capabilities

# mace-ping's least privilege in its own netns (what the README's container recipe names)
LEAST_PRIVILEGE = ("bpf", "perfmon", "net_raw")

WITHOUT_CAPABILITIES = with_capabilities()
