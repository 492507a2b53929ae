//! The properties every run of `epx_ingress` and `epx_trace` must have, decided from the
//! frame in, the frame out, the verdict, the frontends the planner wrote and the conntrack
//! entries at the packet's key before (and, for the live program, after) the run:
//!
//! - the verdict is one of TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT;
//! - a frame the program does not handle (another EtherType, a bad IPv4 version or header
//!   length, another protocol, headers cut short) passes untouched;
//! - a TCP, UDP or SCTP packet that matches no flow, no frontend and no backend passes untouched,
//!   and is never dropped;
//! - a rewrite changes nothing but addresses, ports, checksums and, when the program routes
//!   the packet itself, the TTL by one; checksums valid before are valid after (IPv4
//!   header, TCP/UDP over the pseudo-header, SCTP's CRC32c over the packet, computed
//!   here from scratch), and a UDP checksum of zero ("none") or an SCTP CRC of zero (left
//!   to the device) stays zero;
//! - a rewrite is the one a conntrack entry at the packet's key names (the live program
//!   records every translation it makes), or a new flow's: to one of the frontend's
//!   backends, from the client, the frontend (hairpin) or a node address, with the
//!   client's port or one of the SNAT range;
//! - a new connection meets its frontend's state: no backends and `Local` policy → drop;
//!   no endpoints at all → an ICMP port unreachable exactly as the kernel builds one (or a
//!   drop); a client outside the source ranges → drop; backends → a translation (or a drop
//!   for lack of a port or entry, never passed untranslated);
//! - a packet the program would translate and forward may instead be answered, as the
//!   kernel's forwarding checks answer (issue 19): ICMP "time exceeded" when its TTL runs
//!   out here, "fragmentation needed" naming an MTU below its length, exactly as the
//!   kernel builds them, from a node address (or, without a route back, the packet's
//!   destination); never a packet of nothing ours;
//! - a datagram's first fragment is held to the rules of a packet (its L4 checksum aside:
//!   it covers bytes the fragment does not carry), and its fate is recorded in FRAGMENTS
//!   for the rest of the datagram (live program): dropped, refused or answered → the rest
//!   dropped; translated → the rest to the same addresses, routed the same way;
//! - a later fragment follows the record of its first fragment as it stood before the run,
//!   or passes untouched (no record, or one that expired): rewritten only to the addresses
//!   the record names, routed only when the record says so, dropped only when the record
//!   says so (or the program routes it and cannot: too big, out of TTL); only addresses,
//!   the IPv4 checksum (kept valid) and a routed one's TTL change;
//! - an ICMP error is rewritten only when it quotes a tracked flow, consistently with it
//!   (the quoted tuple becomes the reverse of what its flow's entry names, the outer
//!   addresses its ends), and dropped only then; its checksums stay valid: the outer IPv4
//!   and ICMP ones, the quoted IPv4 header's and, when it quotes the whole packet, the
//!   quoted TCP/UDP/SCTP one (a zero UDP checksum or SCTP CRC stays zero). Other ICMP
//!   passes untouched.

use proxy_common::{CtKey, CtValue, FragmentKey, FragmentValue, fragment_verdict, proto, sctp};
use proxy_userspace::plan::EmptyFrontend;

use crate::cluster::{Flows, Frontends, NODE};
use crate::datapath::wire::{
    self, ETH_LEN, End, ICMP_LEN, IPV4_MIN_LEN, Ipv4, Shape, Transport, ends, tuple,
};
use crate::datapath::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

/// Which program ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// `epx_ingress`: records flows.
    Live,
    /// `epx_trace`: the dry run, records nothing.
    DryRun,
}

/// What a run did, for the summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// BPF_PROG_TEST_RUN refuses the frame (see `test_runnable`).
    NotRun,
    Untouched,
    Translated,
    Routed,
    Refused,
    /// Answered with the forwarding checks' ICMP error.
    Answered,
    Dropped,
}

/// One run to check.
pub struct Run<'a> {
    pub program: Program,
    pub input: &'a [u8],
    pub verdict: u32,
    pub output: &'a [u8],
    /// The entries at [`flow_key`] before the run, and (live program) after it.
    pub before: Flows,
    pub after: Flows,
    /// The entries at the reverse of the output's tuple after the run (live program): a new
    /// flow's reply entry.
    pub reply: Flows,
    /// For a fragment, its datagram's key, as the generator made it.
    pub datagram: Option<CtKey>,
    /// For a fragment, the FRAGMENTS record of its datagram ([`datagram_of`]) before the
    /// run, and (live program) after it.
    pub record_before: Option<FragmentValue>,
    pub record_after: Option<FragmentValue>,
}

/// The FRAGMENTS key of a TCP, UDP or SCTP fragment, as the program reads it off the wire.
pub fn datagram_of(frame: &[u8]) -> Option<FragmentKey> {
    let Shape::Fragment(ip) = wire::shape(frame) else {
        return None;
    };
    proto::is_balanced(ip.protocol).then(|| FragmentKey {
        src_addr: u32::from_ne_bytes(ip.src),
        dst_addr: u32::from_ne_bytes(ip.dst),
        id: u16::from_ne_bytes([frame[ETH_LEN + 4], frame[ETH_LEN + 5]]),
        proto: ip.protocol,
        _pad: 0,
    })
}

/// The conntrack key whose entries decide a frame: a packet's own (a first fragment's too),
/// a later fragment's datagram's, an ICMP error's quoted flow's (the reverse of the quoted
/// tuple: the error travels the other way).
pub fn flow_key(frame: &[u8], datagram: Option<CtKey>) -> Option<CtKey> {
    match wire::shape(frame) {
        Shape::Transport(packet) => Some(packet.key()),
        // A first fragment carries its ports: its own key, whatever made it.
        Shape::Fragment(ip) => match first_fragment(frame, &ip) {
            Some(first) if ip.fragment_offset == 0 => Some(first.key()),
            _ => datagram,
        },
        Shape::Icmp(ip) => quoted(frame, &ip).map(|quote| reverse(&quote.key())),
        Shape::Foreign => None,
    }
}

fn reverse(key: &CtKey) -> CtKey {
    CtKey::new(key.tuple.reversed(), key.proto)
}

pub fn check(run: &Run, frontends: &Frontends) -> Result<Outcome, String> {
    let untouched = run.verdict == TC_ACT_OK && run.output == run.input;
    if ![TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&run.verdict) {
        return Err(format!("unexpected verdict {}", run.verdict));
    }
    match wire::shape(run.input) {
        Shape::Foreign if untouched => Ok(Outcome::Untouched),
        Shape::Foreign => {
            Err("a frame the program does not handle was not passed untouched".into())
        }
        Shape::Transport(packet) => transport(run, frontends, &packet, true),
        Shape::Fragment(ip) => fragment(run, frontends, &ip),
        Shape::Icmp(ip) => icmp(run, &ip),
    }
}

/// A TCP, UDP or SCTP packet; `whole`: not a fragment, so its checksum can be checked and a new
/// connection must be decided.
fn transport(
    run: &Run,
    frontends: &Frontends,
    packet: &Transport,
    whole: bool,
) -> Result<Outcome, String> {
    let frontend = frontends.get(packet.dst, packet.proto());
    let backend = frontends.is_backend(packet.dst, packet.proto());
    let new = run.before.is_empty();
    if run.verdict == TC_ACT_SHOT {
        if frontend.is_none() && !backend && new {
            return Err("dropped a packet of no flow, no frontend and no backend".into());
        }
        return Ok(Outcome::Dropped);
    }
    let refused = run.verdict == TC_ACT_REDIRECT
        && whole
        && refusal(run.input).as_deref() == Some(run.output);
    if refused {
        // Also where the packet's entry expired: it counts as a new connection.
        let empty = frontend.is_some_and(|frontend| {
            frontend.backends.is_empty() && frontend.when_empty == EmptyFrontend::Reject
        });
        if !empty {
            return Err(
                "refused a packet that is no connection to a frontend without endpoints".into(),
            );
        }
        return Ok(Outcome::Refused);
    }
    if run.verdict == TC_ACT_REDIRECT
        && let Some(answer) = forwarding_answer(run.input, run.output)
    {
        if frontend.is_none() && !backend && new {
            return Err("answered for the forwarding step a packet of nothing ours".into());
        }
        return answer.map(|()| Outcome::Answered);
    }
    if let Some(frontend) = frontend.filter(|_| new && whole) {
        if !frontend.admits(packet.src.addr) {
            return Err("a new connection from outside the source ranges was not dropped".into());
        }
        if frontend.backends.is_empty() {
            return Err(match frontend.when_empty {
                EmptyFrontend::Drop => {
                    "a new connection to a frontend without local endpoints was not dropped".into()
                }
                EmptyFrontend::Reject => format!(
                    "a new connection to a frontend without endpoints was neither refused \
                     nor dropped; the refusal would be\n{}",
                    wire::hex(&refusal(run.input).unwrap_or_default())
                ),
            });
        }
    }
    if run.verdict == TC_ACT_OK && run.output == run.input {
        if frontend.is_some() && new && whole {
            return Err("a new connection to a frontend passed untranslated".into());
        }
        return Ok(Outcome::Untouched);
    }
    let routed = run.verdict == TC_ACT_REDIRECT;
    let out = if whole {
        match wire::shape(run.output) {
            Shape::Transport(out) => out,
            _ => return Err("the rewritten packet is no longer TCP, UDP or SCTP".into()),
        }
    } else {
        (wire::ipv4(run.output).and_then(|ip| first_fragment(run.output, &ip)))
            .ok_or("the rewritten first fragment is no longer one")?
    };
    rewritten_bytes(run, packet, &out, routed, whole)?;
    let to = tuple(out.src, out.dst);
    let recorded = |flows: &Flows| flows.values().any(|flow| flow.to == to);
    if run.program == Program::Live && !recorded(&run.after) {
        return Err("rewrote a packet to a tuple no conntrack entry at its key names".into());
    }
    if !recorded(&run.before) {
        let backends = frontend.map(|frontend| &frontend.backends);
        new_flow(run.program, packet, &out, backends, backend, frontends)?;
        let restores = |flow: &CtValue| flow.to == tuple(packet.dst, packet.src);
        if run.program == Program::Live && whole && !run.reply.values().any(restores) {
            return Err("a new flow's reply entry does not restore what the client sent".into());
        }
    }
    Ok(if routed {
        Outcome::Routed
    } else {
        Outcome::Translated
    })
}

/// A translation no earlier entry named: a new flow to a frontend, or a direct flow to a
/// backend whose source port was remapped after a clash. (The dry run shows an SNAT port
/// of the compiled-in range: `ebpf-proxy trace` loads its program without the daemon's
/// `--snat-port-range`.)
fn new_flow(
    program: Program,
    packet: &Transport,
    out: &Transport,
    frontend_backends: Option<&std::collections::HashSet<End>>,
    backend: bool,
    frontends: &Frontends,
) -> Result<(), String> {
    let (min, max) = (
        crate::cluster::SNAT_PORTS.min,
        crate::cluster::SNAT_PORTS.max,
    );
    let snat_port = (min..=max).contains(&out.src.port);
    if let Some(backends) = frontend_backends {
        if !backends.contains(&out.dst) {
            return Err(format!(
                "a new flow went to {:?}, none of its frontend's backends {backends:?}",
                out.dst
            ));
        }
        let from_client = out.src.addr == packet.src.addr;
        let hairpin = out.src.addr == packet.dst.addr;
        let snat = out.src.addr == NODE;
        let port_ok =
            out.src.port == packet.src.port || snat_port || (snat && program == Program::DryRun);
        if !(from_client || hairpin || snat) || !port_ok {
            return Err(format!(
                "a new flow's source became {:?}: neither the client, the frontend nor the \
                 node, or a port neither the client's nor of the SNAT range",
                out.src
            ));
        }
        return Ok(());
    }
    let remapped = backend
        && out.dst == packet.dst
        && out.src.addr == packet.src.addr
        && snat_port
        && frontends.is_backend(out.dst, packet.proto());
    if !remapped {
        return Err("rewrote a packet of no flow and no frontend".into());
    }
    Ok(())
}

/// A TCP, UDP or SCTP packet's rewrite (into `out`) touched only addresses, ports, checksums
/// and (routed) the TTL, and kept its checksums valid (the L4 one only when `whole`: a
/// first fragment's covers bytes it does not carry).
fn rewritten_bytes(
    run: &Run,
    packet: &Transport,
    out: &Transport,
    routed: bool,
    whole: bool,
) -> Result<(), String> {
    let l4 = packet.ip.l4_offset();
    let csum = packet.csum_offset()..packet.csum_offset() + csum_len(packet.proto());
    let mut allowed = vec![l4..l4 + 4, csum.clone()];
    allowed.extend(ip_fields(routed));
    only_changed(
        run.input,
        run.output,
        &allowed,
        routed.then_some(ETH_LEN + 8),
    )?;
    ip_checksum_kept(run, &packet.ip)?;
    if !whole {
        return Ok(());
    }
    zero_checksum_kept(run.input, run.output, packet)?;
    if wire::l4_checksum_valid(run.input, packet) == Some(true)
        && wire::l4_checksum_valid(run.output, out) != Some(true)
    {
        return Err("a valid TCP/UDP/SCTP checksum became invalid".into());
    }
    Ok(())
}

/// The width of the L4 checksum field: SCTP's CRC32c is 4 bytes.
fn csum_len(protocol: u8) -> usize {
    if protocol == proto::SCTP { 4 } else { 2 }
}

/// A UDP checksum of zero ("none") and an SCTP CRC of zero (left to the device) stay zero.
fn zero_checksum_kept(input: &[u8], output: &[u8], packet: &Transport) -> Result<(), String> {
    if packet.proto() == proto::TCP {
        return Ok(());
    }
    let csum = packet.csum_offset()..packet.csum_offset() + csum_len(packet.proto());
    let zero = |frame: &[u8]| {
        frame
            .get(csum.clone())
            .is_some_and(|field| field.iter().all(|&b| b == 0))
    };
    if zero(input) && !zero(output) {
        return Err("a UDP checksum or SCTP CRC of zero did not stay zero".into());
    }
    Ok(())
}

/// The IPv4 header bytes a translation may change: checksum and addresses, the TTL when
/// routed.
fn ip_fields(routed: bool) -> Vec<std::ops::Range<usize>> {
    let ttl = ETH_LEN + 8;
    let ttl = if routed { ttl..ttl + 1 } else { ttl..ttl };
    vec![ttl, ETH_LEN + 10..ETH_LEN + 20]
}

/// The output has the input's length and differs only inside `allowed`; a routed frame's
/// TTL or hop limit (the byte at `routed_ttl`) is one less. (Both families.)
pub fn only_changed(
    input: &[u8],
    output: &[u8],
    allowed: &[std::ops::Range<usize>],
    routed_ttl: Option<usize>,
) -> Result<(), String> {
    if output.len() != input.len() {
        return Err(format!(
            "a rewrite changed the length from {} to {}",
            input.len(),
            output.len()
        ));
    }
    let changed = (input.iter().zip(output))
        .enumerate()
        .find(|(at, (a, b))| a != b && !allowed.iter().any(|range| range.contains(at)));
    if let Some((at, _)) = changed {
        return Err(format!(
            "a rewrite changed byte {at}, which it has no business with"
        ));
    }
    if let Some(ttl) = routed_ttl
        && output[ttl] != input[ttl].wrapping_sub(1)
    {
        return Err("a routed packet's TTL or hop limit did not go down by one".into());
    }
    Ok(())
}

fn ip_checksum_kept(run: &Run, ip: &Ipv4) -> Result<(), String> {
    if wire::ip_checksum_valid(run.input, ip) == Some(true)
        && wire::ip_checksum_valid(run.output, ip) != Some(true)
    {
        return Err("a valid IPv4 header checksum became invalid".into());
    }
    Ok(())
}

/// A fragment: the first of its datagram like a packet, its fate recorded; a later one as
/// its datagram's record says.
fn fragment(run: &Run, frontends: &Frontends, ip: &Ipv4) -> Result<Outcome, String> {
    let first = first_fragment(run.input, ip).filter(|_| ip.fragment_offset == 0);
    let Some(first) = first else {
        return later_fragment(run, ip);
    };
    let refused =
        run.verdict == TC_ACT_REDIRECT && refusal(run.input).as_deref() == Some(run.output);
    let outcome = if refused {
        let empty = frontends
            .get(first.dst, first.proto())
            .is_some_and(|frontend| frontend.backends.is_empty());
        if !empty {
            return Err(
                "refused the first fragment of a datagram to a frontend with backends".into(),
            );
        }
        Outcome::Refused
    } else {
        transport(run, frontends, &first, false)?
    };
    if run.program == Program::Live {
        fate_recorded(run, &first, outcome)?;
    }
    Ok(outcome)
}

/// The record a first fragment left for the rest of its datagram matches what became of
/// it. One that passed untouched may have been no first fragment to the program (headers
/// cut short): it records only that the rest passes.
fn fate_recorded(run: &Run, first: &Transport, outcome: Outcome) -> Result<(), String> {
    let record = run.record_after;
    let follows = |to: &Transport, routed: bool| {
        record.is_some_and(|record| {
            record.verdict == fragment_verdict::FORWARD
                && record.to == tuple(to.src, to.dst)
                && (!routed || record.routes_itself != 0)
        })
    };
    let kept = match outcome {
        Outcome::Dropped | Outcome::Refused | Outcome::Answered => {
            record.is_some_and(|record| record.verdict == fragment_verdict::DROP)
        }
        Outcome::Translated | Outcome::Routed => {
            let out = (wire::ipv4(run.output).and_then(|ip| first_fragment(run.output, &ip)))
                .ok_or("the rewritten first fragment is no longer one")?;
            follows(&out, outcome == Outcome::Routed)
        }
        Outcome::Untouched => record == run.record_before || follows(first, false),
        Outcome::NotRun => true,
    };
    if !kept {
        return Err(format!(
            "a first fragment ({outcome:?}) left a record its datagram's rest would not follow \
             it by: {record:?}"
        ));
    }
    Ok(())
}

/// A later fragment: as its datagram's record (before the run) says, or untouched.
fn later_fragment(run: &Run, ip: &Ipv4) -> Result<Outcome, String> {
    let record = run.record_before;
    if run.verdict == TC_ACT_SHOT {
        // Dropped with its first fragment, or routed by the program and unable to go.
        let due = record.is_some_and(|record| {
            record.verdict == fragment_verdict::DROP || record.routes_itself != 0
        });
        if !due {
            return Err(format!(
                "dropped a later fragment whose first fragment was neither dropped nor \
                 routed: {record:?}"
            ));
        }
        return Ok(Outcome::Dropped);
    }
    if run.verdict == TC_ACT_OK && run.output == run.input {
        return Ok(Outcome::Untouched);
    }
    let routed = run.verdict == TC_ACT_REDIRECT;
    only_changed(
        run.input,
        run.output,
        &ip_fields(routed),
        routed.then_some(ETH_LEN + 8),
    )?;
    ip_checksum_kept(run, ip)?;
    let out = wire::ipv4(run.output).ok_or("the rewritten fragment is no longer IPv4")?;
    let Some(record) = record.filter(|record| record.verdict == fragment_verdict::FORWARD) else {
        return Err(format!(
            "rewrote a later fragment no first fragment went ahead of: {record:?}"
        ));
    };
    let (src, dst) = ends(&record.to);
    if (out.src, out.dst) != (src.addr, dst.addr) {
        return Err(format!(
            "a later fragment went to {:?} → {:?}, not where its first fragment went: {record:?}",
            out.src, out.dst
        ));
    }
    if routed && record.routes_itself == 0 {
        return Err("routed a later fragment whose first fragment the kernel forwarded".into());
    }
    Ok(if routed {
        Outcome::Routed
    } else {
        Outcome::Translated
    })
}

/// If `output` is an ICMP "time exceeded" or "fragmentation needed" about `input`, exactly
/// as the kernel's forwarding step builds it from a node address or the packet's
/// destination: whether it was due (a TTL of 1 or less; an MTU below the packet's length).
fn forwarding_answer(input: &[u8], output: &[u8]) -> Option<Result<(), String>> {
    if input.len() < ETH_LEN + IPV4_MIN_LEN + 8 || output.len() < ETH_LEN + IPV4_MIN_LEN + 8 {
        return None;
    }
    let ip = &output[ETH_LEN..];
    let (kind, code) = (ip[IPV4_MIN_LEN], ip[IPV4_MIN_LEN + 1]);
    let rest: [u8; 4] = ip[IPV4_MIN_LEN + 4..IPV4_MIN_LEN + 8].try_into().ok()?;
    let from: [u8; 4] = ip[12..16].try_into().ok()?;
    if !matches!((kind, code), (11, 0) | (3, 4))
        || wire::icmp_answer_for(input, from, kind, code, rest) != output
    {
        return None;
    }
    let destination: [u8; 4] = input[ETH_LEN + 16..ETH_LEN + 20].try_into().ok()?;
    if from != NODE && from != destination {
        return Some(Err(format!("answered from {from:?}, no node address")));
    }
    let ttl = input[ETH_LEN + 8];
    let length = usize::from(u16::from_be_bytes([input[ETH_LEN + 2], input[ETH_LEN + 3]]));
    let mtu = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
    Some(match kind {
        11 if ttl > 1 => Err(format!("answered \"time exceeded\" for a TTL of {ttl}")),
        3 if mtu >= length || mtu < 68 => Err(format!(
            "answered \"fragmentation needed\" (MTU {mtu}) for {length} bytes"
        )),
        _ => Ok(()),
    })
}

/// The ICMP port unreachable the program owes `frame`, if it holds the 28 bytes of IPv4
/// the answer quotes.
fn refusal(frame: &[u8]) -> Option<Vec<u8>> {
    (frame.len() >= ETH_LEN + IPV4_MIN_LEN + 8).then(|| wire::port_unreachable_for(frame))
}

/// A first fragment seen as the packet it starts (its ports are there), if they are.
fn first_fragment(frame: &[u8], ip: &Ipv4) -> Option<Transport> {
    let l4 = ip.l4_offset();
    if !proto::is_balanced(ip.protocol) || frame.len() < l4 + 4 {
        return None;
    }
    let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    Some(Transport {
        ip: *ip,
        src: End::new(ip.src, port(l4)),
        dst: End::new(ip.dst, port(l4 + 2)),
        tcp_flags: match ip.protocol {
            proto::TCP => frame.get(l4 + 13).copied().unwrap_or(0),
            proto::SCTP => sctp::tcp_flags_of(frame.get(l4 + 12).copied().unwrap_or(0)),
            _ => 0,
        },
    })
}

/// The packet an ICMP error quotes: its IPv4 header and the first 8 bytes after it, as
/// a TCP, UDP or SCTP packet (ports only).
fn quoted(frame: &[u8], ip: &Ipv4) -> Option<Transport> {
    let icmp = ip.l4_offset();
    if !is_error(*frame.get(icmp)?) {
        return None;
    }
    let inner_at = icmp + ICMP_LEN;
    let inner = frame.get(inner_at..)?;
    let header_len = usize::from(*inner.first()? & 0x0f) * 4;
    if inner.first()? >> 4 != 4 || header_len < IPV4_MIN_LEN || inner.len() < header_len + 8 {
        return None;
    }
    let protocol = inner[9];
    if !proto::is_balanced(protocol) {
        return None;
    }
    let port = |at: usize| u16::from_be_bytes([inner[at], inner[at + 1]]);
    let src = End::new(inner[12..16].try_into().ok()?, port(header_len));
    let dst = End::new(inner[16..20].try_into().ok()?, port(header_len + 2));
    Some(Transport {
        ip: Ipv4 {
            header_len,
            total_len: usize::from(u16::from_be_bytes([inner[2], inner[3]])),
            protocol,
            src: src.addr,
            dst: dst.addr,
            fragment_offset: u16::from_be_bytes([inner[6] & 0x1f, inner[7]]),
        },
        src,
        dst,
        tcp_flags: 0,
    })
}

/// ICMP types that quote a packet: destination unreachable, source quench, redirect, time
/// exceeded, parameter problem.
fn is_error(kind: u8) -> bool {
    matches!(kind, 3 | 4 | 5 | 11 | 12)
}

/// ICMP: passed untouched, dropped, or (an error) translated as the flow it quotes is.
fn icmp(run: &Run, ip: &Ipv4) -> Result<Outcome, String> {
    if run.verdict == TC_ACT_SHOT {
        // Routed by the program and unable to go (out of TTL).
        if run.before.is_empty() {
            return Err("dropped ICMP that quotes no tracked flow".into());
        }
        return Ok(Outcome::Dropped);
    }
    if run.verdict == TC_ACT_OK && run.output == run.input {
        return Ok(Outcome::Untouched);
    }
    let Some(before) = quoted(run.input, ip) else {
        return Err("rewrote ICMP that is no error quoting a TCP, UDP or SCTP packet".into());
    };
    let routed = run.verdict == TC_ACT_REDIRECT;
    let icmp_at = ip.l4_offset();
    let inner_at = icmp_at + ICMP_LEN;
    let inner_l4 = inner_at + before.ip.header_len;
    let mut allowed = ip_fields(routed);
    allowed.extend([
        icmp_at + 2..icmp_at + 4,
        inner_at + 10..inner_at + 20,
        inner_l4..inner_l4 + 8,
        // A quote long enough to hold the whole TCP header: its checksum follows the
        // ports, as netfilter's `tcp_manip_pkt` updates it then.
        inner_l4 + 16..inner_l4 + 18,
    ]);
    if before.proto() == proto::SCTP {
        // A whole quoted SCTP packet's CRC32c follows its ports (`sctp_manip_pkt`).
        allowed.push(inner_l4 + 8..inner_l4 + 12);
    }
    only_changed(
        run.input,
        run.output,
        &allowed,
        routed.then_some(ETH_LEN + 8),
    )?;
    ip_checksum_kept(run, ip)?;
    let message_valid = |frame: &[u8]| {
        ip.payload(frame)
            .map(|message| wire::ones_complement_sum(message) == 0xffff)
    };
    if message_valid(run.input) == Some(true) && message_valid(run.output) != Some(true) {
        return Err("a valid ICMP checksum became invalid".into());
    }
    let inner_header = |frame: &[u8]| {
        frame
            .get(inner_at..inner_at + before.ip.header_len)
            .map(|header| wire::ones_complement_sum(header) == 0xffff)
    };
    if inner_header(run.input) == Some(true) && inner_header(run.output) != Some(true) {
        return Err("a valid checksum of the quoted IPv4 header became invalid".into());
    }
    let outer = wire::ipv4(run.output).ok_or("the rewritten error is no longer IPv4")?;
    let after = quoted(run.output, &outer).ok_or("the rewritten error quotes nothing")?;
    quoted_checksum_kept(run, inner_at, &before, &after)?;
    let quoted_back = tuple(after.dst, after.src);
    let consistent = |flow: &CtValue| {
        let (to_src, to_dst) = ends(&flow.to);
        flow.to == quoted_back
            && (outer.dst == ip.dst || outer.dst == to_dst.addr)
            && (outer.src == ip.src || outer.src == to_src.addr)
    };
    if !run
        .before
        .values()
        .chain(run.after.values())
        .any(consistent)
    {
        return Err(
            "rewrote an ICMP error so that the packet it quotes is not its flow's translation"
                .into(),
        );
    }
    Ok(if routed {
        Outcome::Routed
    } else {
        Outcome::Translated
    })
}

/// When an error quotes the whole packet, the quoted TCP/UDP/SCTP checksum valid before is
/// valid after, and a zero UDP checksum or SCTP CRC stays zero.
fn quoted_checksum_kept(
    run: &Run,
    inner_at: usize,
    before: &Transport,
    after: &Transport,
) -> Result<(), String> {
    // The quoted packet as a frame of its own: any 14 bytes in front of its IPv4 header.
    let as_frame = |frame: &[u8]| [&frame[..ETH_LEN], &frame[inner_at..]].concat();
    let (input, output) = (as_frame(run.input), as_frame(run.output));
    zero_checksum_kept(&input, &output, before).map_err(|error| format!("quoted: {error}"))?;
    if wire::l4_checksum_valid(&input, before) == Some(true)
        && wire::l4_checksum_valid(&output, after) != Some(true)
    {
        return Err("a valid checksum of the quoted TCP/UDP/SCTP packet became invalid".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The properties have teeth: each catches the violation it is about.

    use std::collections::HashSet;

    use super::*;
    use crate::cluster::{FrontendState, Frontends};
    use crate::datapath::wire::{Ipv4Spec, frame, sctp_packet, segment};

    const CLIENT: End = End::new([198, 18, 0, 10], 40_000);
    const VIP: End = End::new([198, 19, 0, 10], 80);
    const BACKEND: End = End::new([198, 18, 1, 10], 8080);
    const ELSEWHERE: End = End::new([198, 18, 5, 5], 80);

    fn udp(src: End, dst: End) -> Vec<u8> {
        let ip = Ipv4Spec::new(src.addr, dst.addr, proto::UDP);
        frame(&ip, &segment(&ip, src.port, dst.port, 0, b"query", true))
    }

    fn frontends(backends: &[End]) -> Frontends {
        let mut frontends = Frontends::default();
        let state = FrontendState {
            backends: backends.iter().copied().collect::<HashSet<_>>(),
            when_empty: EmptyFrontend::Reject,
            source_ranges: Vec::new(),
        };
        for protocol in [proto::UDP, proto::SCTP] {
            frontends.frontends.insert((VIP, protocol), state.clone());
            frontends
                .backends
                .extend(backends.iter().map(|backend| (*backend, protocol)));
        }
        frontends
    }

    fn sctp(src: End, dst: End, checksum: bool) -> Vec<u8> {
        let ip = Ipv4Spec::new(src.addr, dst.addr, proto::SCTP);
        frame(&ip, &sctp_packet(src.port, dst.port, 1, b"init", checksum))
    }

    fn flows(to: Option<(End, End)>) -> Flows {
        Flows {
            assured: None,
            pending: to.map(|(src, dst)| CtValue {
                to: tuple(src, dst),
                ..CtValue::default()
            }),
        }
    }

    fn run<'a>(input: &'a [u8], verdict: u32, output: &'a [u8], after: Flows) -> Run<'a> {
        Run {
            program: Program::Live,
            input,
            verdict,
            output,
            before: Flows::default(),
            after,
            reply: flows(Some((VIP, CLIENT))),
            datagram: None,
            record_before: None,
            record_after: None,
        }
    }

    #[test]
    fn a_new_flow_must_go_to_a_backend_of_its_frontend_and_be_recorded() {
        let input = udp(CLIENT, VIP);
        let good = udp(CLIENT, BACKEND);
        let recorded = flows(Some((CLIENT, BACKEND)));
        let frontends = frontends(&[BACKEND]);
        let check =
            |output: &[u8], after: Flows| check(&run(&input, TC_ACT_OK, output, after), &frontends);
        assert_eq!(check(&good, recorded), Ok(Outcome::Translated));
        assert!(check(&good, Flows::default()).is_err(), "not recorded");
        assert!(
            check(&input, Flows::default()).is_err(),
            "passed untranslated"
        );
        let stray = udp(CLIENT, ELSEWHERE);
        assert!(check(&stray, flows(Some((CLIENT, ELSEWHERE)))).is_err());
        let mut broken = good.clone();
        broken[ETH_LEN + 10] ^= 1;
        assert!(check(&broken, recorded).is_err(), "IPv4 checksum broken");
        let mut payload = good.clone();
        *payload.last_mut().unwrap() ^= 1;
        assert!(check(&payload, recorded).is_err(), "payload changed");
        assert!(
            (super::check(&run(&input, 1, &good, recorded), &frontends)).is_err(),
            "unexpected verdict"
        );
    }

    #[test]
    fn an_sctp_rewrite_must_keep_its_crc32c_valid_and_a_zero_one_zero() {
        let frontends = frontends(&[BACKEND]);
        let recorded = || flows(Some((CLIENT, BACKEND)));
        let check = |input: &[u8], output: &[u8]| {
            check(&run(input, TC_ACT_OK, output, recorded()), &frontends)
        };
        let input = sctp(CLIENT, VIP, true);
        let good = sctp(CLIENT, BACKEND, true);
        assert_eq!(check(&input, &good), Ok(Outcome::Translated));
        let crc = ETH_LEN + IPV4_MIN_LEN + 8;
        let mut stale = good.clone();
        stale[crc..crc + 4].copy_from_slice(&input[crc..crc + 4]);
        assert!(check(&input, &stale).is_err(), "CRC not updated");
        let offloaded = sctp(CLIENT, VIP, false);
        assert_eq!(
            check(&offloaded, &sctp(CLIENT, BACKEND, false)),
            Ok(Outcome::Translated)
        );
        assert!(check(&offloaded, &good).is_err(), "a zero CRC filled in");
    }

    #[test]
    fn a_packet_of_nothing_ours_must_pass_untouched() {
        let input = udp(CLIENT, ELSEWHERE);
        let frontends = frontends(&[BACKEND]);
        let check = |verdict, output: &[u8]| {
            check(&run(&input, verdict, output, Flows::default()), &frontends)
        };
        assert_eq!(check(TC_ACT_OK, &input), Ok(Outcome::Untouched));
        assert!(check(TC_ACT_SHOT, &input).is_err(), "dropped");
        assert!(
            check(TC_ACT_OK, &udp(CLIENT, BACKEND)).is_err(),
            "rewritten"
        );
    }

    #[test]
    fn a_frontend_without_endpoints_refuses_exactly_as_the_kernel_would() {
        let input = udp(CLIENT, VIP);
        let frontends = frontends(&[]);
        let refusal = wire::port_unreachable_for(&input);
        let check = |verdict, output: &[u8]| {
            check(&run(&input, verdict, output, Flows::default()), &frontends)
        };
        assert_eq!(check(TC_ACT_REDIRECT, &refusal), Ok(Outcome::Refused));
        assert_eq!(check(TC_ACT_SHOT, &input), Ok(Outcome::Dropped));
        assert!(check(TC_ACT_OK, &input).is_err(), "passed");
        let mut wrong = refusal.clone();
        wrong[ETH_LEN + 8] = 63;
        assert!(check(TC_ACT_REDIRECT, &wrong).is_err(), "another TTL");
    }

    #[test]
    fn foreign_frames_fragments_and_icmp_are_held_to_their_rules() {
        let frontends = frontends(&[BACKEND]);
        let check = |input: &[u8], output: &[u8], datagram| {
            let mut run = run(input, TC_ACT_OK, output, Flows::default());
            run.datagram = datagram;
            check(&run, &frontends)
        };
        let mut arp = udp(CLIENT, VIP);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let mut changed = arp.clone();
        changed[20] ^= 1;
        assert_eq!(check(&arp, &arp, None), Ok(Outcome::Untouched));
        assert!(check(&arp, &changed, None).is_err());

        let mut later = udp(CLIENT, VIP);
        later[ETH_LEN + 7] = 8;
        wire::fix_ip_checksum(&mut later);
        let mut moved = later.clone();
        moved[ETH_LEN + 16..ETH_LEN + 20].copy_from_slice(&BACKEND.addr);
        wire::fix_ip_checksum(&mut moved);
        let datagram = Some(CtKey::new(tuple(CLIENT, VIP), proto::UDP));
        assert_eq!(check(&later, &later, datagram), Ok(Outcome::Untouched));
        assert!(
            check(&later, &moved, datagram).is_err(),
            "no first fragment went ahead"
        );
        let later_run = |verdict, output: &[u8], record| {
            let mut run = run(&later, verdict, output, Flows::default());
            run.record_before = record;
            super::check(&run, &frontends)
        };
        let went = |to: End, verdict| FragmentValue {
            to: tuple(CLIENT, to),
            verdict,
            ..FragmentValue::default()
        };
        let to_backend = Some(went(BACKEND, fragment_verdict::FORWARD));
        assert_eq!(
            later_run(TC_ACT_OK, &moved, to_backend),
            Ok(Outcome::Translated)
        );
        let elsewhere = Some(went(ELSEWHERE, fragment_verdict::FORWARD));
        assert!(
            later_run(TC_ACT_OK, &moved, elsewhere).is_err(),
            "elsewhere"
        );
        let dropped = Some(went(BACKEND, fragment_verdict::DROP));
        assert!(
            later_run(TC_ACT_OK, &moved, dropped).is_err(),
            "first dropped"
        );
        assert!(
            later_run(TC_ACT_SHOT, &moved, to_backend).is_err(),
            "dropped"
        );
        assert_eq!(
            later_run(TC_ACT_SHOT, &moved, dropped),
            Ok(Outcome::Dropped)
        );

        let ip = Ipv4Spec::new(CLIENT.addr, VIP.addr, 1);
        let echo = frame(&ip, &wire::icmp(8, 0, [0; 4], b"ping"));
        let mut rewritten = echo.clone();
        rewritten[ETH_LEN + 16..ETH_LEN + 20].copy_from_slice(&BACKEND.addr);
        wire::fix_ip_checksum(&mut rewritten);
        assert_eq!(check(&echo, &echo, None), Ok(Outcome::Untouched));
        assert!(check(&echo, &rewritten, None).is_err(), "an echo rewritten");

        // An error about a flow the node does not track: neither rewritten nor dropped.
        let quoted = udp(BACKEND, CLIENT);
        let ip = Ipv4Spec::new(CLIENT.addr, BACKEND.addr, 1);
        let error = frame(&ip, &wire::icmp(3, 3, [0; 4], &quoted[ETH_LEN..]));
        assert_eq!(check(&error, &error, None), Ok(Outcome::Untouched));
        let dropped = run(&error, TC_ACT_SHOT, &error, Flows::default());
        assert!(super::check(&dropped, &frontends).is_err(), "dropped");
    }
}
