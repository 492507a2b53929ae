//! The properties of [`check`](crate::check) for IPv6 frames (`epx_ingress6`, `epx_xdp6`
//! and their dry runs), decided the same way from the frame in, the frame out, the verdict,
//! the IPv6 frontends the planner wrote and the CONNTRACK6 / FRAGMENTS6 entries before and
//! after the run. The ones that hold for both families:
//!
//! - the verdict is one of TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT;
//! - a frame the IPv6 path does not handle (another version, another protocol or extension
//!   header, a routing header with segments left, a deeper chain, headers cut short, a
//!   fragment of another protocol) passes untouched;
//! - a TCP, UDP or SCTP packet of no flow, no frontend and no backend passes untouched and
//!   is never dropped;
//! - a rewrite changes only addresses, ports, the L4 checksum and (routed) the hop limit,
//!   by one, through `check::only_changed`; a valid TCP/UDP checksum (over the IPv6
//!   pseudo-header) or SCTP CRC32c stays valid, a zero CRC stays zero;
//! - a rewrite is the one a CONNTRACK6 entry at the packet's key names (live program), or
//!   a new flow's: to a backend of its frontend, from the client or the frontend
//!   (hairpin), with the client's port or one of the SNAT range; its reply entry restores
//!   what the client sent;
//! - a new connection meets its frontend: outside the source ranges or without endpoints
//!   it is not passed (refused with ICMPv6 port unreachable only without endpoints);
//! - an ICMPv6 answer (port unreachable, packet too big, time exceeded) goes to the
//!   packet's source, quotes its start, has a valid checksum, and is sent only for a
//!   packet of something ours;
//! - a first fragment is held to the rules of a packet (its L4 checksum aside), and a
//!   translated one leaves a FRAGMENTS6 record naming where it went; a later fragment
//!   follows its datagram's record as it stood before the run (addresses and hop limit
//!   only) or passes untouched, and is dropped only when the record says so;
//! - ICMPv6 is rewritten or dropped only when it is an error quoting a tracked flow, the
//!   quoted tuple then the reverse of what the flow's entry names, its checksum kept
//!   valid.
//!
//! IPv4-only, not here: the IPv4 header checksum, options and header length, RFC 768's
//! "no checksum" UDP zero (IPv6 has none), ICMP fragmentation-needed. The fuzzed node
//! has IPv6 ClusterIP frontends only (no IPv6 node address), so IPv6 NodePorts, SNAT and
//! source ranges are left to `testrun6`.

use proxy_common::{CtKey, CtValue, FragmentKey, FragmentValue, Ipv6, fragment_verdict, proto};
use proxy_userspace::plan::EmptyFrontend;

use crate::check::{Outcome, Program, only_changed};
use crate::cluster::{Flows, Frontends, SNAT_PORTS};
use crate::datapath::ipv6::v6;
use crate::datapath::wire::{ETH_LEN, ICMPV6, IPV6_LEN};
use crate::datapath::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
use crate::ipv6::{End6, Packet6, Shape6, addresses, checksum_valid6, shape6, tuple6};

/// The hop limit's place in a frame.
const HOP_LIMIT: usize = ETH_LEN + 7;
/// Both addresses.
const ADDRESSES: std::ops::Range<usize> = ETH_LEN + 8..ETH_LEN + IPV6_LEN;

/// One run of an IPv6 frame to check.
pub struct Run6<'a> {
    pub program: Program,
    pub input: &'a [u8],
    pub verdict: u32,
    pub output: &'a [u8],
    /// The CONNTRACK6 entries at [`flow_key6`] before the run and (live) after it.
    pub before: Flows<Ipv6>,
    pub after: Flows<Ipv6>,
    /// The entries at the reverse of the output's tuple after the run (live).
    pub reply: Flows<Ipv6>,
    /// The FRAGMENTS6 record of the frame's datagram ([`datagram6`]) before and after.
    pub record_before: Option<FragmentValue<Ipv6>>,
    pub record_after: Option<FragmentValue<Ipv6>>,
}

/// The CONNTRACK6 key whose entries decide a frame: a packet's (a first fragment's) own,
/// an ICMPv6 error's quoted flow's reversed.
pub fn flow_key6(frame: &[u8]) -> Option<CtKey<Ipv6>> {
    match shape6(frame) {
        Shape6::Transport(packet) => Some(packet.key()),
        Shape6::Icmp(at) => {
            quoted6(frame, at).map(|(src, dst, protocol)| CtKey::new(tuple6(dst, src), protocol))
        }
        Shape6::LaterFragment(_) | Shape6::Foreign => None,
    }
}

/// The FRAGMENTS6 key of a first or later fragment.
pub fn datagram6(frame: &[u8]) -> Option<FragmentKey<Ipv6>> {
    match shape6(frame) {
        Shape6::Transport(packet) => packet.first_fragment,
        Shape6::LaterFragment(key) => Some(key),
        Shape6::Icmp(_) | Shape6::Foreign => None,
    }
}

/// Whether XDP must leave the frame to tc: fragments and ICMPv6.
pub fn only_tc6(frame: &[u8]) -> bool {
    match shape6(frame) {
        Shape6::Transport(packet) => packet.first_fragment.is_some(),
        Shape6::LaterFragment(_) | Shape6::Icmp(_) => true,
        Shape6::Foreign => false,
    }
}

pub fn check6(run: &Run6, frontends: &Frontends) -> Result<Outcome, String> {
    if ![TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&run.verdict) {
        return Err(format!("unexpected verdict {}", run.verdict));
    }
    let untouched = run.verdict == TC_ACT_OK && run.output == run.input;
    match shape6(run.input) {
        Shape6::Foreign if untouched => Ok(Outcome::Untouched),
        Shape6::Foreign => {
            Err("an IPv6 frame the program does not handle was not passed untouched".into())
        }
        Shape6::Transport(packet) => transport6(run, frontends, &packet, untouched),
        Shape6::LaterFragment(_) => later_fragment6(run, untouched),
        Shape6::Icmp(at) => icmp6(run, at, untouched),
    }
}

fn transport6(
    run: &Run6,
    frontends: &Frontends,
    packet: &Packet6,
    untouched: bool,
) -> Result<Outcome, String> {
    let frontend = frontends.frontends6.get(&(packet.dst, packet.proto));
    let backend = frontends.backends6.contains(&(packet.dst, packet.proto));
    let new = run.before.is_empty();
    let whole = packet.first_fragment.is_none();
    let ours = frontend.is_some() || backend || !new;
    if run.verdict == TC_ACT_SHOT {
        if !ours {
            return Err("dropped an IPv6 packet of no flow, no frontend and no backend".into());
        }
        return Ok(Outcome::Dropped);
    }
    if run.verdict == TC_ACT_REDIRECT
        && let Some(answer) = answer6(run.input, run.output)
    {
        let kind = answer?;
        if !ours {
            return Err("answered an IPv6 packet of nothing ours".into());
        }
        if kind != [1, 4] {
            return Ok(Outcome::Answered);
        }
        let empty = frontend.is_some_and(|frontend| {
            frontend.backends.is_empty() && frontend.when_empty == EmptyFrontend::Reject
        });
        if !empty {
            return Err(
                "refused an IPv6 packet that is no connection to a frontend without \
                        endpoints"
                    .into(),
            );
        }
        return Ok(Outcome::Refused);
    }
    if let Some(frontend) = frontend.filter(|_| new && whole) {
        if !frontend.admits(packet.src.addr) {
            return Err("a new IPv6 connection from outside the source ranges passed".into());
        }
        if frontend.backends.is_empty() {
            return Err("a new IPv6 connection to a frontend without endpoints passed".into());
        }
    }
    if untouched {
        if frontend.is_some() && new && whole {
            return Err("a new IPv6 connection to a frontend passed untranslated".into());
        }
        return Ok(Outcome::Untouched);
    }
    let routed = run.verdict == TC_ACT_REDIRECT;
    let Shape6::Transport(out) = shape6(run.output) else {
        return Err("the rewritten IPv6 packet is no longer TCP, UDP or SCTP".into());
    };
    let mut allowed = vec![ADDRESSES, packet.l4..packet.l4 + 4, packet.checksum_field()];
    allowed.extend(routed.then_some(HOP_LIMIT..HOP_LIMIT + 1));
    only_changed(run.input, run.output, &allowed, routed.then_some(HOP_LIMIT))?;
    if whole {
        checksum_kept(run, packet, &out)?;
    }
    let to = tuple6(out.src, out.dst);
    let recorded = |flows: &Flows<Ipv6>| flows.values().any(|flow| flow.to == to);
    if run.program == Program::Live && !recorded(&run.after) {
        return Err(
            "rewrote an IPv6 packet to a tuple no CONNTRACK6 entry at its key names".into(),
        );
    }
    if !recorded(&run.before) {
        new_flow6(run.program, packet, &out, frontends)?;
        let restores = |flow: &CtValue<Ipv6>| flow.to == tuple6(packet.dst, packet.src);
        if run.program == Program::Live && whole && !run.reply.values().any(restores) {
            return Err(
                "a new IPv6 flow's reply entry does not restore what the client sent".into(),
            );
        }
    }
    if run.program == Program::Live && packet.first_fragment.is_some() {
        let follows = run.record_after.is_some_and(|record| {
            record.verdict == fragment_verdict::FORWARD
                && record.to == to
                && (!routed || record.routes_itself != 0)
        });
        if !follows {
            return Err(format!(
                "a translated IPv6 first fragment left a FRAGMENTS6 record its datagram's \
                 rest would not follow it by: {:?}",
                run.record_after
            ));
        }
    }
    Ok(if routed {
        Outcome::Routed
    } else {
        Outcome::Translated
    })
}

/// A valid L4 checksum stays valid; a zero SCTP CRC (left to the device) stays zero.
fn checksum_kept(run: &Run6, packet: &Packet6, out: &Packet6) -> Result<(), String> {
    if checksum_valid6(run.input, packet.l4, packet.proto)
        && !checksum_valid6(run.output, out.l4, out.proto)
    {
        return Err("a valid IPv6 TCP/UDP/SCTP checksum became invalid".into());
    }
    let field = packet.checksum_field();
    let zero = |frame: &[u8]| frame[field.clone()].iter().all(|&byte| byte == 0);
    if packet.proto == proto::SCTP && zero(run.input) && !zero(run.output) {
        return Err("an SCTP CRC of zero did not stay zero".into());
    }
    Ok(())
}

/// A translation no earlier entry named: a new flow to one of its frontend's backends, or
/// a direct flow to a backend whose source port was remapped after a clash.
fn new_flow6(
    program: Program,
    packet: &Packet6,
    out: &Packet6,
    frontends: &Frontends,
) -> Result<(), String> {
    let snat_port = (SNAT_PORTS.min..=SNAT_PORTS.max).contains(&out.src.port);
    if let Some(frontend) = frontends.frontends6.get(&(packet.dst, packet.proto)) {
        if !frontend.backends.contains(&out.dst) {
            return Err(format!(
                "a new IPv6 flow went to {:?}, none of its frontend's backends {:?}",
                out.dst, frontend.backends
            ));
        }
        let source_ok = out.src.addr == packet.src.addr || out.src.addr == packet.dst.addr;
        let port_ok = out.src.port == packet.src.port || snat_port;
        if !source_ok || !(port_ok || program == Program::DryRun) {
            return Err(format!(
                "a new IPv6 flow's source became {:?}: neither the client nor the frontend, \
                 or a port neither the client's nor of the SNAT range",
                out.src
            ));
        }
        return Ok(());
    }
    let remapped = out.dst == packet.dst
        && out.src.addr == packet.src.addr
        && snat_port
        && frontends.backends6.contains(&(out.dst, packet.proto));
    if !remapped {
        return Err("rewrote an IPv6 packet of no flow and no frontend".into());
    }
    Ok(())
}

/// When `output` is an ICMPv6 message sent back to `input`'s source: its type and code,
/// or what is wrong with it (a checksum, or a quote that is not the packet's start).
fn answer6(input: &[u8], output: &[u8]) -> Option<Result<[u8; 2], String>> {
    let at = ETH_LEN + IPV6_LEN;
    let is_answer = output.len() >= at + 8
        && output.get(12..14) == input.get(12..14)
        && output[ETH_LEN + 6] == ICMPV6
        && addresses(output).1 == addresses(input).0
        && matches!(output[at], 1..=3);
    if !is_answer {
        return None;
    }
    let quote = &output[at + 8..];
    Some(if !checksum_valid6(output, at, ICMPV6) {
        Err("an ICMPv6 answer with an invalid checksum".into())
    } else if quote.is_empty() || !input[ETH_LEN..].starts_with(quote) {
        Err("an ICMPv6 answer that does not quote the packet's start".into())
    } else {
        Ok([output[at], output[at + 1]])
    })
}

/// A later fragment: as its datagram's record (before the run) says, or untouched.
fn later_fragment6(run: &Run6, untouched: bool) -> Result<Outcome, String> {
    let record = run.record_before;
    if run.verdict == TC_ACT_SHOT {
        let due = record.is_some_and(|record| {
            record.verdict == fragment_verdict::DROP || record.routes_itself != 0
        });
        if !due {
            return Err(format!(
                "dropped a later IPv6 fragment whose first fragment was neither dropped nor \
                 routed: {record:?}"
            ));
        }
        return Ok(Outcome::Dropped);
    }
    if untouched {
        return Ok(Outcome::Untouched);
    }
    let routed = run.verdict == TC_ACT_REDIRECT;
    let mut allowed = vec![ADDRESSES];
    allowed.extend(routed.then_some(HOP_LIMIT..HOP_LIMIT + 1));
    only_changed(run.input, run.output, &allowed, routed.then_some(HOP_LIMIT))?;
    let Some(record) = record.filter(|record| record.verdict == fragment_verdict::FORWARD) else {
        return Err(format!(
            "rewrote a later IPv6 fragment no first fragment went ahead of: {record:?}"
        ));
    };
    let (src, dst) = addresses(run.output);
    if (v6(src), v6(dst)) != (record.to.src_addr, record.to.dst_addr)
        || (routed && record.routes_itself == 0)
    {
        return Err(format!(
            "a later IPv6 fragment went elsewhere than its record says: {record:?}"
        ));
    }
    Ok(if routed {
        Outcome::Routed
    } else {
        Outcome::Translated
    })
}

/// The ends and protocol of the packet an ICMPv6 error at `at` quotes (its fixed header
/// and the ports after it, no extension headers).
fn quoted6(frame: &[u8], at: usize) -> Option<(End6, End6, u8)> {
    if !matches!(*frame.get(at)?, 1..=4) {
        return None;
    }
    let inner = frame.get(at + 8..)?;
    if inner.len() < IPV6_LEN + 4 || inner[0] >> 4 != 6 || !proto::is_balanced(inner[6]) {
        return None;
    }
    let addr = |offset: usize| -> [u8; 16] { inner[offset..offset + 16].try_into().unwrap() };
    let port = |offset: usize| u16::from_be_bytes([inner[offset], inner[offset + 1]]);
    Some((
        End6::new(addr(8), port(IPV6_LEN)),
        End6::new(addr(24), port(IPV6_LEN + 2)),
        inner[6],
    ))
}

/// ICMPv6: untouched, or (an error about a tracked flow) translated as its flow is.
fn icmp6(run: &Run6, at: usize, untouched: bool) -> Result<Outcome, String> {
    let tracked = !run.before.is_empty() || !run.after.is_empty();
    if run.verdict == TC_ACT_SHOT {
        if run.before.is_empty() {
            return Err("dropped ICMPv6 that quotes no tracked flow".into());
        }
        return Ok(Outcome::Dropped);
    }
    if untouched {
        return Ok(Outcome::Untouched);
    }
    if !tracked || quoted6(run.input, at).is_none() {
        return Err("rewrote ICMPv6 that is no error quoting a tracked flow".into());
    }
    if run.output.len() != run.input.len() {
        return Err("a rewritten ICMPv6 error changed its length".into());
    }
    if checksum_valid6(run.input, at, ICMPV6) && !checksum_valid6(run.output, at, ICMPV6) {
        return Err("a valid ICMPv6 checksum became invalid".into());
    }
    let (src, dst, _) = quoted6(run.output, at).ok_or("the rewritten error quotes nothing")?;
    let quoted_back = tuple6(dst, src);
    if !(run.before.values().chain(run.after.values())).any(|flow| flow.to == quoted_back) {
        return Err(
            "rewrote an ICMPv6 error so that the packet it quotes is not its flow's \
             translation"
                .into(),
        );
    }
    Ok(if run.verdict == TC_ACT_REDIRECT {
        Outcome::Routed
    } else {
        Outcome::Translated
    })
}

#[cfg(test)]
mod tests {
    //! The IPv6 properties have teeth: each catches the violation it is about.

    use std::collections::HashSet;

    use super::*;
    use crate::cluster::FrontendState;
    use crate::datapath::ipv6::{L4, frame6, frame6_with, ip6};
    use crate::datapath::wire::Extension;

    const CLIENT: End6 = End6::new(ip6(0x18, 10), 40_000);
    const VIP: End6 = End6::new(ip6(0x19, 10), 53);
    const BACKEND: End6 = End6::new(ip6(0x118, 10), 5353);
    const ELSEWHERE: End6 = End6::new(ip6(0x118, 99), 53);

    fn udp(src: End6, dst: End6) -> Vec<u8> {
        frame6((src.addr, src.port), (dst.addr, dst.port), L4::Udp)
    }

    fn frontends(backends: &[End6]) -> Frontends {
        let mut frontends = Frontends::default();
        let state = FrontendState {
            backends: backends.iter().copied().collect::<HashSet<_>>(),
            when_empty: EmptyFrontend::Reject,
            source_ranges: Vec::new(),
        };
        frontends.frontends6.insert((VIP, proto::UDP), state);
        (frontends.backends6).extend(backends.iter().map(|backend| (*backend, proto::UDP)));
        frontends
    }

    fn flows(to: Option<(End6, End6)>) -> Flows<Ipv6> {
        Flows {
            assured: None,
            pending: to.map(|(src, dst)| CtValue {
                to: tuple6(src, dst),
                ..CtValue::default()
            }),
        }
    }

    fn run<'a>(input: &'a [u8], verdict: u32, output: &'a [u8], after: Flows<Ipv6>) -> Run6<'a> {
        Run6 {
            program: Program::Live,
            input,
            verdict,
            output,
            before: Flows::default(),
            after,
            reply: flows(Some((VIP, CLIENT))),
            record_before: None,
            record_after: None,
        }
    }

    #[test]
    fn a_new_ipv6_flow_must_go_to_a_backend_of_its_frontend_and_be_recorded() {
        let input = udp(CLIENT, VIP);
        let good = udp(CLIENT, BACKEND);
        let recorded = flows(Some((CLIENT, BACKEND)));
        let frontends = frontends(&[BACKEND]);
        let check =
            |output: &[u8], after| check6(&run(&input, TC_ACT_OK, output, after), &frontends);
        assert_eq!(check(&good, recorded), Ok(Outcome::Translated));
        assert!(check(&good, Flows::default()).is_err(), "not recorded");
        assert!(
            check(&input, Flows::default()).is_err(),
            "passed untranslated"
        );
        let stray = udp(CLIENT, ELSEWHERE);
        assert!(check(&stray, flows(Some((CLIENT, ELSEWHERE)))).is_err());
        let mut broken = good.clone();
        *broken.last_mut().unwrap() ^= 1;
        assert!(check(&broken, recorded).is_err(), "payload changed");
        let mut checksum = good.clone();
        checksum[ETH_LEN + IPV6_LEN + 6] ^= 1;
        assert!(check(&checksum, recorded).is_err(), "checksum broken");
        let mut hop_limit = good.clone();
        hop_limit[HOP_LIMIT] -= 1;
        assert!(
            check(&hop_limit, recorded).is_err(),
            "hop limit, not routed"
        );
    }

    #[test]
    fn ipv6_frames_of_nothing_ours_or_not_handled_must_pass_untouched() {
        let frontends = frontends(&[BACKEND]);
        let check = |input: &[u8], verdict, output: &[u8]| {
            check6(&run(input, verdict, output, Flows::default()), &frontends)
        };
        let stray = udp(CLIENT, ELSEWHERE);
        assert_eq!(check(&stray, TC_ACT_OK, &stray), Ok(Outcome::Untouched));
        assert!(check(&stray, TC_ACT_SHOT, &stray).is_err(), "dropped");
        // A routing header with segments left: addressed onward, not handled.
        let routing = Extension {
            kind: 43,
            bytes: vec![0, 0, 4, 1, 0, 0, 0, 0],
        };
        let onward = frame6_with(
            (CLIENT.addr, CLIENT.port),
            (VIP.addr, VIP.port),
            L4::Udp,
            &[routing],
            64,
        );
        assert!(matches!(shape6(&onward), Shape6::Foreign));
        assert_eq!(check(&onward, TC_ACT_OK, &onward), Ok(Outcome::Untouched));
        assert!(check(&onward, TC_ACT_SHOT, &onward).is_err(), "dropped");
    }

    #[test]
    fn a_later_ipv6_fragment_follows_its_record_only() {
        let frontends = frontends(&[BACKEND]);
        let whole = udp(CLIENT, VIP);
        let later =
            crate::datapath::wire::ipv6_fragments(&[&whole[..], &[0; 1500][..]].concat(), 7)
                .pop()
                .unwrap();
        assert!(matches!(shape6(&later), Shape6::LaterFragment(_)));
        let mut moved = later.clone();
        moved[ETH_LEN + 24..ETH_LEN + 40].copy_from_slice(&BACKEND.addr);
        let later_run = |verdict, output: &[u8], record| {
            let mut run = run(&later, verdict, output, Flows::default());
            run.record_before = record;
            check6(&run, &frontends)
        };
        let went = |to: End6, verdict| FragmentValue {
            to: tuple6(CLIENT, to),
            verdict,
            ..FragmentValue::default()
        };
        let forward = Some(went(BACKEND, fragment_verdict::FORWARD));
        assert_eq!(
            later_run(TC_ACT_OK, &moved, forward),
            Ok(Outcome::Translated)
        );
        assert!(later_run(TC_ACT_OK, &moved, None).is_err(), "no record");
        let elsewhere = Some(went(ELSEWHERE, fragment_verdict::FORWARD));
        assert!(
            later_run(TC_ACT_OK, &moved, elsewhere).is_err(),
            "elsewhere"
        );
        assert!(later_run(TC_ACT_SHOT, &later, forward).is_err(), "dropped");
        let dropped = Some(went(BACKEND, fragment_verdict::DROP));
        assert_eq!(
            later_run(TC_ACT_SHOT, &later, dropped),
            Ok(Outcome::Dropped)
        );
    }
}
