"""Run a command as root with every capability dropped: the "no CAP_BPF / CAP_NET_RAW" case.

Staying uid 0 (instead of switching to nobody) keeps the checkout readable wherever it was
cloned; an empty bounding set means execve grants no capability at all.
"""

WITHOUT_CAPABILITIES = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
