"""Correlation: which device is the host's outer one, and what is (not) corrected."""

from mace_tools.correlate import (
    LATE_RETURN_SLACK_NS,
    correlate,
    measured,
    outer_departure,
    stages,
)
from mace_tools.model import (
    Hook,
    HopReply,
    KernelEvent,
    Namespaces,
    Packet,
    Probe,
    ProbeRecord,
    Reply,
    TraceResult,
)
from mace_tools.output.atlas import mace_summary as atlas_summary
from mace_tools.output.text import mace_summary
from mace_tools.output.traceroute import document, hop_record
from mace_tools.stats import Tally

P, H, T = 101, 202, 303  # prober (container), host, target netns inodes
GUESS = Namespaces(P)  # run inside the container: the host's netns is inferred
KNOWN = Namespaces(P, H)  # run on the host, entering the container's netns
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
    reply = Reply(1, "198.18.0.2", 64, 64, 5_000_000_000 + int(raw_us * 1000))
    return probe, reply


def test_container_probe_is_corrected_at_the_hosts_outer_device() -> None:
    probe, reply = probe_reply()
    m = correlate(probe, reply, container_path(), GUESS)
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


def test_probing_from_a_host_with_a_physical_nic_uses_its_own_device() -> None:
    # The request enters no other netns: the prober's netns is the host's.
    events = [
        ev(3, REQ, X, H, 4, "eno1"),
        ev(10, REP, RX, H, 4, "eno1"),
        ev(13, REP, RECV, H, 4, "eno1"),
    ]
    probe, reply = probe_reply(15)
    m = correlate(probe, reply, events, Namespaces(H))
    assert m.rtt_corrected_ns == 7_000
    assert m.egress_ns == 3_000
    assert m.ingress_ns == 0  # delivered where it arrived


def test_a_neighbour_netns_that_answers_is_not_taken_for_granted() -> None:
    # From a netns whose veth leads straight to the target's netns, the events cannot tell
    # a target from a host whose departure event is missing: no correction, honestly.
    events = [
        ev(3, REQ, X, H, 4, "out0"), ev(4, REQ, RX, T, 2, "tgt0"),
        ev(9, REP, X, T, 2, "tgt0"), ev(10, REP, RX, H, 4, "out0"),
    ]
    probe, reply = probe_reply(15)
    assert not correlate(probe, reply, events, Namespaces(H)).corrected
    # known to be the host (it entered no other netns to probe), it is corrected there
    m = correlate(probe, reply, events, Namespaces(H, H))
    assert m.rtt_corrected_ns == 7_000


def test_loopback() -> None:
    events = [
        ev(2, REQ, X, P, 1, "lo"), ev(3, REQ, RX, P, 1, "lo"),
        ev(6, REP, X, P, 1, "lo"), ev(7, REP, RX, P, 1, "lo"),
    ]
    probe, reply = probe_reply(9)
    m = correlate(probe, reply, events, GUESS)
    assert (m.rtt_corrected_ns, m.egress_ns, m.ingress_ns) == (5_000, 2_000, 0)


def test_missing_reply_arrival_gives_no_correction() -> None:
    events = [e for e in container_path() if not (e.packet is REP and e.dev == "out0")]
    probe, reply = probe_reply()
    m = correlate(probe, reply, events, GUESS)
    assert m.rtt_corrected_ns is None and m.egress_ns is None and m.ingress_ns is None
    assert not m.corrected
    assert m.rtt_raw_ns == 60_000  # the raw RTT is still reported
    assert m.path  # and so is what the kernel did see


def test_no_events_gives_raw_only() -> None:
    probe, reply = probe_reply()
    m = correlate(probe, reply, [], GUESS)
    assert not m.corrected and not m.path


def test_reply_arrival_before_departure_is_not_used() -> None:
    # A stale arrival event (e.g. of an earlier reply with the same seq) must not be paired.
    events = [ev(1, REP, RX, H, 4, "out0")] + [
        e for e in container_path() if not (e.packet is REP and e.dev == "out0")]
    probe, reply = probe_reply()
    assert not correlate(probe, reply, events, GUESS).corrected


def test_outer_device_skips_target_side_netns() -> None:
    path = stages(container_path(), SENT_MONO)
    out = outer_departure(path, GUESS)
    assert out is not None and (out.dev, out.netns) == ("out0", H)


def test_known_host_netns_gives_the_same_correction() -> None:
    probe, reply = probe_reply()
    m = correlate(probe, reply, container_path(), KNOWN)
    assert (m.rtt_corrected_ns, m.outer_dev) == (12_000, f"out0@{H}")


def test_missing_outer_departure_never_falls_back_to_the_container_device() -> None:
    # Before: the prober's own eth0 stood in, a 39 µs "correction" with veth, bridge and NAT.
    events = [e for e in container_path() if not (e.packet is REQ and e.dev == "out0")]
    probe, reply = probe_reply()
    for ns in (GUESS, KNOWN):
        m = correlate(probe, reply, events, ns)
        assert not m.corrected and m.outer_dev is None


def test_all_host_events_missing_gives_no_correction_when_the_host_is_known() -> None:
    events = [e for e in container_path() if e.netns != H]
    probe, reply = probe_reply()
    assert not correlate(probe, reply, events, KNOWN).corrected


def test_stale_departure_of_an_earlier_probe_is_ignored() -> None:
    # An out0 departure 520 µs before this probe was sent (an earlier lap's seq) once
    # turned 12 µs into 532 µs; events before the send point are not this probe's.
    stale = KernelEvent(SENT_MONO - 500_000, 1, REQ, X, 4, H, "out0", "198.18.0.1",
                        "198.18.0.2")
    events = [stale] + [e for e in container_path() if not (e.packet is REQ and e.dev == "out0")]
    probe, reply = probe_reply()
    for ns in (GUESS, KNOWN):
        m = correlate(probe, reply, events, ns)
        assert not m.corrected
        assert all(s.t_ns >= 0 for s in m.path)


def test_known_host_that_the_probe_never_crossed_gives_no_correction() -> None:
    # mace-ping entered the container from a netns that is not its host (a lab driven from
    # the root netns): no device there saw the probe, so nothing is corrected.
    probe, reply = probe_reply()
    m = correlate(probe, reply, container_path(), Namespaces(P, 999))
    assert not m.corrected


def test_reply_delivery_unseen_in_the_container_still_corrects() -> None:
    # macvlan: the reply is handed to the container's device without a tracepoint in P;
    # the outer device saw both packets, so the correction stands, ingress is unknown.
    events = [e for e in container_path() if not (e.packet is REP and e.netns == P)]
    probe, reply = probe_reply()
    m = correlate(probe, reply, events, KNOWN)
    assert m.rtt_corrected_ns == 12_000 and m.egress_ns == 20_000 and m.ingress_ns is None


def test_nested_host_takes_the_outermost_device() -> None:
    # container P -> inner host I (its own bridge, NAT) -> outer host H -> target
    inner = 150
    events = [
        ev(5, REQ, X, P, 2, "eth0"), ev(6, REQ, RX, inner, 5, "veth0"),
        ev(9, REQ, X, inner, 3, "eth0"), ev(10, REQ, RX, H, 7, "vinner"),
        ev(15, REQ, X, H, 4, "out0"), ev(16, REQ, RX, T, 2, "tgt0"),
        ev(20, REP, X, T, 2, "tgt0"), ev(21, REP, RX, H, 4, "out0"),
        ev(25, REP, X, H, 7, "vinner"), ev(26, REP, RX, inner, 3, "eth0"),
        ev(29, REP, X, inner, 5, "veth0"), ev(30, REP, RX, P, 2, "eth0"),
    ]
    probe, reply = probe_reply(40)
    m = correlate(probe, reply, events, KNOWN)
    assert (m.rtt_corrected_ns, m.outer_dev) == (6_000, f"out0@{H}")
    # inferred from inside the container, the first host (the inner one) is taken
    m = correlate(probe, reply, events, GUESS)
    assert m.outer_dev == f"eth0@{inner}"


def test_events_lost_in_flight_give_no_correction() -> None:
    # The ring overflowed while the probe was in flight: any device may be missing from
    # its path (the last one the request left, say), so nothing is corrected.
    probe, reply = probe_reply()
    m = correlate(probe, reply, container_path(), KNOWN, complete=False)
    assert not m.corrected and m.path


def host_prober_path(returned_us: float) -> list[KernelEvent]:
    """A prober in the host netns: its socket stamps the reply where it returns, at
    out0 (the same instant as our program's return stamp, but for its run delay)."""
    return [ev(5, REQ, X, H, 4, "out0"), ev(7, REQ, RX, T, 2, "tgt0"),
            ev(15, REP, X, T, 2, "tgt0"), ev(returned_us, REP, RX, H, 4, "out0")]


def record_of(returned_us: float, hook: Hook = RX) -> ProbeRecord:
    return ProbeRecord(1, SENT_MONO + 5_000, SENT_MONO + int(returned_us * 1000), 0, H, 4,
                       "out0", hook)


def test_a_return_stamped_after_the_receive_stamp_is_refused() -> None:
    # Raw ends at the socket's receive stamp, 17 µs after the send; a return stamped 31 µs
    # after that (our program ran late, seen once in a suite) would give a correction 31 µs
    # too high: shown raw instead, and marked.
    probe, reply = probe_reply(raw_us=17.0)
    from_events = correlate(probe, reply, host_prober_path(48.0), Namespaces(H, H))
    from_record = measured(probe, reply, record_of(48.0))
    for m in (from_events, from_record):
        assert m.rtt_raw_ns == 17_000
        assert not m.corrected and m.egress_ns is None and m.late_kernel_stamp


def test_a_return_within_the_slack_of_the_receive_stamp_is_corrected() -> None:
    probe, reply = probe_reply(raw_us=17.0)
    slack_us = LATE_RETURN_SLACK_NS / 1000
    for returned_us in (16.9, 17.0 + slack_us):
        m = correlate(probe, reply, host_prober_path(returned_us), Namespaces(H, H))
        r = measured(probe, reply, record_of(returned_us))
        assert m.rtt_corrected_ns == r.rtt_corrected_ns == int(returned_us * 1000) - 5_000
        assert not m.late_kernel_stamp and not r.late_kernel_stamp
    m = measured(probe, reply, record_of(17.0 + slack_us + 0.001))
    assert not m.corrected and m.late_kernel_stamp


def test_a_return_stamped_after_netif_receive_skb_is_not_checked() -> None:
    # Past netif_receive_skb's own stamp the tracepoint may come much later (RPS, a GRO
    # batch; a tunnel keeps its underlay's stamp): a correction taken there is not
    # refused, from the record or from the path.
    probe, reply = probe_reply(raw_us=17.0)
    path = host_prober_path(48.0)
    path[-1] = path[-1]._replace(hook=RECV)
    for m in (measured(probe, reply, record_of(48.0, RECV)),
              measured(probe, reply, record_of(48.0, -1)),  # an agent's state without it
              correlate(probe, reply, path, Namespaces(H, H))):
        assert m.rtt_corrected_ns == 43_000 and not m.late_kernel_stamp


def test_a_late_kernel_stamp_is_counted_apart_in_the_summary() -> None:
    probe, reply = probe_reply(raw_us=17.0)
    tally = Tally()
    tally.add(measured(probe, reply, record_of(12.0)))
    tally.add(measured(probe, reply, record_of(48.0)))
    s = tally.summary(transmitted=2, errors=0, elapsed_ms=1, kernel_events_lost=0)
    assert s.received == 2 and s.corrected_count == 1 and s.late_kernel_stamps == 1
    assert "kernel data 1/2 replies (50%), 1 refused as late, " in mace_summary(s)[1]
    assert atlas_summary(s, b"\0" * 8)["late_kernel_stamps"] == 1


def test_a_late_kernel_stamp_in_a_traceroute_document() -> None:
    probe, reply = probe_reply(raw_us=17.0)
    late = correlate(probe, reply, host_prober_path(48.0), Namespaces(H, H))
    fine = correlate(probe, reply, host_prober_path(16.0), Namespaces(H, H))
    result = TraceResult(nonce=b"\0" * 8, source_addr="198.18.1.10",
                         hops={2: [HopReply(2, late), HopReply(2, fine), HopReply(2)]})
    doc = document(dst_name="t", dst_addr="198.18.0.2", method="icmp", size=60, paris=False,
                   result=result, hops=[hop_record(2, result.hops[2])])
    assert doc["mace"]["late_kernel_stamps"] == 1
    assert doc["mace"]["replies"] == 2 and doc["mace"]["replies_with_kernel_data"] == 1
    first, second, _ = doc["result"][0]["result"]
    assert first["late_kernel_stamp"] == 1 and first["rtt_corrected"] is None
    assert "late_kernel_stamp" not in second and second["rtt_corrected"] == 0.011
