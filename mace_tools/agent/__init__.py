"""mace-agent: the host service that gives unprivileged containers corrected RTTs.

The agent holds the host's one program set (kernel/programs.py) and serves clients on a
unix socket (protocol.py). A client (mace-ping, mace-traceroute in any container that
mounts the socket's directory) asks for a run; the agent names the client from the kernel
(peer.py), chooses the run's nonce, adds the run for the client's own netns, and hands it
the run's ring buffer and lost counter as file descriptors: the client reads its records
straight from the kernel, as a privileged run does, and the agent spends nothing per
record (server.py). client.py is the client's side.
"""
