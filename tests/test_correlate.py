"""Correlation: which device is the host's outer one, and what is (not) corrected."""

from mace_tools.correlate import correlate, outer_departure, stages
from mace_tools.model import Hook, KernelEvent, Packet, Probe, Reply

P, H, T = 101, 202, 303  # prober (container), host, target netns inodes
REQ, REP = Packet.REQUEST, Packet.REPLY
X, RX, RECV = Hook.XMIT, Hook.RX, Hook.RECEIVE
SENT_MONO = 1_000_000


def ev(t_us: float, packet: Packet, hook: Hook, netns: int, ifindex: int, dev: str,
       seq: int = 1) -> KernelEvent:
    return KernelEvent(SENT_MONO + int(t_us * 1000), seq, packet, hook, ifindex, netns, dev,
                       "198.18.1.10", "198.18.0.2")


def container_path() -> list[KernelEvent]:
    """What the lab shows for one probe from a container behind bridge + NAT."""
    return [
        ev(5, REQ, X, P, 2, "eth0"),
        ev(7, REQ, RX, H, 5, "vc0"),
        ev(12, REQ, RECV, H, 5, "vc0"),
        ev(14, REQ, RECV, H, 3, "br0"),
        ev(20, REQ, X, H, 4, "out0"),
        ev(22, REQ, RX, T, 2, "tgt0"),
        ev(30, REP, X, T, 2, "tgt0"),
        ev(32, REP, RX, H, 4, "out0"),
        ev(36, REP, RECV, H, 4, "out0"),
        ev(40, REP, X, H, 3, "br0"),
        ev(42, REP, X, H, 5, "vc0"),
        ev(44, REP, RX, P, 2, "eth0"),
        ev(50, REP, RECV, P, 2, "eth0"),
    ]


def probe_reply(raw_us: float = 60.0) -> tuple[Probe, Reply]:
    probe = Probe(seq=1, sent_mono_ns=SENT_MONO, sent_real_ns=5_000_000_000)
    reply = Reply(1, "198.18.0.2", 64, 64, 5_000_000_000 + int(raw_us * 1000), 0)
    return probe, reply


def test_container_probe_is_corrected_at_the_hosts_outer_device() -> None:
    probe, reply = probe_reply()
    m = correlate(probe, reply, container_path(), prober_netns=P)
    assert m.rtt_raw_ns == 60_000
    assert m.rtt_corrected_ns == 12_000  # out0 reply rx (32) - out0 request tx (20)
    assert m.egress_ns == 20_000
    assert m.ingress_ns == 12_000  # eth0 first arrival (44, netif_rx) - out0 arrival (32)
    assert m.outer_dev == f"out0@{H}"


def test_arrival_is_the_first_hook_per_device() -> None:
    path = stages(container_path(), SENT_MONO)
    out0_reply = [s for s in path if s.packet is REP and s.dev == "out0"]
    assert len(out0_reply) == 1 and out0_reply[0].t_ns == 32_000
    assert [s.t_ns for s in path] == sorted(s.t_ns for s in path)


def test_probing_from_the_host_itself_uses_the_last_own_device() -> None:
    events = [
        ev(3, REQ, X, H, 4, "out0"),
        ev(4, REQ, RX, T, 2, "tgt0"),
        ev(9, REP, X, T, 2, "tgt0"),
        ev(10, REP, RX, H, 4, "out0"),
        ev(13, REP, RECV, H, 4, "out0"),
    ]
    probe, reply = probe_reply(15)
    m = correlate(probe, reply, events, prober_netns=H)
    assert m.rtt_corrected_ns == 7_000
    assert m.egress_ns == 3_000
    assert m.ingress_ns == 0  # delivered where it arrived


def test_loopback() -> None:
    events = [
        ev(2, REQ, X, P, 1, "lo"), ev(3, REQ, RX, P, 1, "lo"),
        ev(6, REP, X, P, 1, "lo"), ev(7, REP, RX, P, 1, "lo"),
    ]
    probe, reply = probe_reply(9)
    m = correlate(probe, reply, events, prober_netns=P)
    assert (m.rtt_corrected_ns, m.egress_ns, m.ingress_ns) == (5_000, 2_000, 0)


def test_missing_reply_arrival_gives_no_correction() -> None:
    events = [e for e in container_path() if not (e.packet is REP and e.dev == "out0")]
    probe, reply = probe_reply()
    m = correlate(probe, reply, events, prober_netns=P)
    assert m.rtt_corrected_ns is None and m.egress_ns is None and m.ingress_ns is None
    assert not m.corrected
    assert m.rtt_raw_ns == 60_000  # the raw RTT is still reported
    assert m.path  # and so is what the kernel did see


def test_no_events_gives_raw_only() -> None:
    probe, reply = probe_reply()
    m = correlate(probe, reply, [], prober_netns=P)
    assert not m.corrected and m.path == []


def test_missing_delivery_in_prober_netns_gives_no_correction() -> None:
    events = [e for e in container_path() if not (e.packet is REP and e.netns == P)]
    probe, reply = probe_reply()
    assert not correlate(probe, reply, events, prober_netns=P).corrected


def test_reply_arrival_before_departure_is_not_used() -> None:
    # A stale arrival event (e.g. of an earlier reply with the same seq) must not be paired.
    events = [ev(1, REP, RX, H, 4, "out0")] + [
        e for e in container_path() if not (e.packet is REP and e.dev == "out0")]
    probe, reply = probe_reply()
    assert not correlate(probe, reply, events, prober_netns=P).corrected


def test_outer_device_skips_target_side_netns() -> None:
    path = stages(container_path(), SENT_MONO)
    out = outer_departure(path, P)
    assert out is not None and (out.dev, out.netns) == ("out0", H)
