//! The two ways to run the packet path: live (`epx_ingress`, `epx_xdp`) and as a dry run
//! (`epx_trace`, `epx_xdp_trace`).
//!
//! One generic packet path serves both, so a trace can never disagree with the program
//! it explains. The live mode counts into STATS and writes conntrack entries; the dry run
//! writes neither (the packet path checks [`Mode::DRY_RUN`] before every conntrack write)
//! and instead records what it decided in the TRACE map. Monomorphization removes every
//! trace hook from `epx_ingress`.
//!
//! The trace record has a place for each family's addresses (`proxy_common::TraceAddresses`):
//! a dry run records the flow, frontend and backend of an IPv6 packet as of an IPv4 one.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use proxy_common::{
    Backend, BackendSet, CtValue, FragmentValue, Origin, TraceRecord, stat, trace_answer, trace_ct,
    trace_fragment, trace_origin, trace_table,
};

use crate::{
    conntrack::Table,
    family::Family,
    lb::{Frontend, Selection},
    stats,
};

/// Per-CPU so the dry run needs no atomics; not pinned: every process that loads
/// `epx_trace` has its own.
#[map]
static TRACE: PerCpuArray<TraceRecord> = PerCpuArray::with_max_entries(1, 0);

/// What the packet path reports to.
pub trait Mode {
    /// True when shared state (conntrack entries, their counters, STATS) must stay as is.
    const DRY_RUN: bool;
    /// The `proxy_common::tail_call` slot of this mode's IPv6 path.
    const IPV6_SLOT: u32;
    /// The path reached the outcome named by a `proxy_common::stat` counter.
    fn count(&self, counter: u32);
    /// A conntrack entry of `table` decided the packet (`kind`: a `trace_ct` constant).
    fn flow_found<A: Family>(&self, _kind: u8, _table: Table, _flow: &CtValue<A>) {}
    /// The packet is addressed to `frontend`.
    fn frontend_found<A: Family>(&self, _frontend: &Frontend<A>) {}
    /// Where the new connection comes from was looked up (it decides the backend set).
    fn origin_found(&self, _origin: Origin) {}
    /// The new connection chooses among `set`.
    fn set_chosen(&self, _set: &BackendSet) {}
    /// A new flow was given the backend in `slot` (1-based) of its set.
    fn backend_selected<A: Family>(
        &self,
        _slot: u16,
        _backend_id: u32,
        _backend: &Backend<A>,
        _maglev: bool,
    ) {
    }
    /// A new flow was given the client's previous backend (session affinity).
    fn affinity_kept<A: Family>(&self, _backend_id: u32, _backend: &Backend<A>) {}
    /// The packet would now be routed by the program (FIB lookup and redirect) out of
    /// `egress_ifindex`: its source became a node address (see `ct_flags::ROUTES_ITSELF`).
    fn routes_itself(&self, _egress_ifindex: u32) {}
    /// The XDP program left the packet to tc (`reason`: a `proxy_common::to_tc` constant).
    fn left_to_tc(&self, _reason: u8) {}
    /// The XDP program's verdict, as its STATS counter (`stat::XDP_*`).
    fn xdp_verdict(&self, _counter: u32) {}
    /// A first fragment: its later fragments are to be treated as `record` says (the live
    /// mode writes it to FRAGMENTS).
    fn first_fragment<A: Family>(&self, _record: &FragmentValue<A>) {}
    /// A later fragment found its datagram's `record`, or none.
    fn later_fragment<A: Family>(&self, _record: Option<&FragmentValue<A>>) {}
    /// An ICMP error of `icmp_type` and `code`, about a tracked flow, is being translated.
    fn icmp_error(&self, _icmp_type: u8, _code: u8) {}
    /// Instead of the packet, an ICMP error (a `trace_answer` constant) goes back to its
    /// sender; `mtu` for "fragmentation needed".
    fn answered(&self, _answer: u8, _mtu: u16) {}

    /// The backend `selection` gave a new flow (or socket), counted and recorded as chosen;
    /// `None` when the drawn slot holds no backend (counted as `backend_missing`).
    #[inline(always)]
    fn chosen<A: Family>(&self, selection: Selection<A>) -> Option<(u32, Backend<A>)> {
        match selection {
            Selection::Affinity { id, backend } => {
                self.count(stat::AFFINITY);
                self.affinity_kept(id, &backend);
                Some((id, backend))
            }
            Selection::Slot {
                slot,
                id,
                backend,
                maglev,
            } => {
                self.backend_selected(slot, id, &backend, maglev);
                Some((id, backend))
            }
            Selection::Missing => {
                self.count(stat::BACKEND_MISSING);
                None
            }
        }
    }
}

/// `epx_ingress`: counts, and the path writes conntrack entries.
pub struct Live;

impl Mode for Live {
    const DRY_RUN: bool = false;
    const IPV6_SLOT: u32 = proxy_common::tail_call::IPV6;

    #[inline(always)]
    fn count(&self, counter: u32) {
        stats::count(counter);
    }

    #[inline(always)]
    fn xdp_verdict(&self, counter: u32) {
        stats::count(counter);
    }
}

/// `epx_trace`: records the decisions in this CPU's TRACE entry.
pub struct DryRun {
    record: *mut TraceRecord,
}

impl DryRun {
    /// Clears this CPU's record and marks it as the one this run writes.
    #[inline(always)]
    pub fn start() -> Option<Self> {
        let record = TRACE.get_ptr_mut(0)?;
        // SAFETY: the pointer comes from a successful lookup of this CPU's slot, which
        // only this CPU writes, with preemption disabled while the program runs.
        unsafe {
            *record = TraceRecord {
                recorded: 1,
                ..TraceRecord::default()
            };
        }
        Some(Self { record })
    }

    /// This run's record. Each borrow ends within the hook that takes it, so two never
    /// overlap.
    #[inline(always)]
    #[expect(clippy::mut_from_ref, reason = "a map value, not data owned by self")]
    fn record(&self) -> &mut TraceRecord {
        // SAFETY: as in `start`: this CPU's slot, written only by this run.
        unsafe { &mut *self.record }
    }
}

impl Mode for DryRun {
    const DRY_RUN: bool = true;
    const IPV6_SLOT: u32 = proxy_common::tail_call::IPV6_TRACE;

    #[inline(always)]
    fn count(&self, counter: u32) {
        // Counters are indexes below `stat::COUNT`, far below 256.
        self.record().outcome = counter as u8;
    }

    #[inline(always)]
    fn flow_found<A: Family>(&self, kind: u8, table: Table, flow: &CtValue<A>) {
        let record = self.record();
        record.conntrack = kind;
        record.table = match table {
            Table::Assured => trace_table::ASSURED,
            Table::Pending => trace_table::PENDING,
        };
        A::traced_mut(record).flow = *flow;
        if kind == trace_ct::FORWARD {
            record.backend_id = flow.backend_id;
        }
    }

    #[inline(always)]
    fn frontend_found<A: Family>(&self, frontend: &Frontend<A>) {
        let record = self.record();
        A::traced_mut(record).frontend = frontend.key;
        record.service = frontend.header;
    }

    #[inline(always)]
    fn origin_found(&self, origin: Origin) {
        self.record().origin = match origin {
            Origin::Pod => trace_origin::POD,
            Origin::Outside | Origin::Node => trace_origin::OUTSIDE,
        };
    }

    #[inline(always)]
    fn set_chosen(&self, set: &BackendSet) {
        self.record().cluster_set = u8::from(set.cluster);
    }

    #[inline(always)]
    fn backend_selected<A: Family>(
        &self,
        slot: u16,
        backend_id: u32,
        backend: &Backend<A>,
        maglev: bool,
    ) {
        let record = self.record();
        record.slot = slot;
        record.maglev = u8::from(maglev);
        record.backend_id = backend_id;
        A::traced_mut(record).backend = *backend;
    }

    #[inline(always)]
    fn affinity_kept<A: Family>(&self, backend_id: u32, backend: &Backend<A>) {
        let record = self.record();
        record.affinity = 1;
        record.backend_id = backend_id;
        A::traced_mut(record).backend = *backend;
    }

    #[inline(always)]
    fn routes_itself(&self, egress_ifindex: u32) {
        let record = self.record();
        record.routes_reply = 1;
        record.egress_ifindex = egress_ifindex;
    }

    #[inline(always)]
    fn left_to_tc(&self, reason: u8) {
        self.record().to_tc = reason;
    }

    #[inline(always)]
    fn first_fragment<A: Family>(&self, record: &FragmentValue<A>) {
        let trace = self.record();
        trace.fragment = trace_fragment::FIRST;
        *A::traced_fragment_mut(trace) = *record;
    }

    #[inline(always)]
    fn later_fragment<A: Family>(&self, record: Option<&FragmentValue<A>>) {
        let trace = self.record();
        trace.fragment = trace_fragment::LATER;
        if let Some(record) = record {
            trace.fragment_found = 1;
            *A::traced_fragment_mut(trace) = *record;
        }
    }

    #[inline(always)]
    fn icmp_error(&self, icmp_type: u8, code: u8) {
        let trace = self.record();
        trace.icmp_type = icmp_type;
        trace.icmp_code = code;
    }

    #[inline(always)]
    fn answered(&self, answer: u8, mtu: u16) {
        let trace = self.record();
        trace.answered = answer;
        if answer == trace_answer::FRAG_NEEDED {
            trace.mtu = mtu;
        }
    }
}
