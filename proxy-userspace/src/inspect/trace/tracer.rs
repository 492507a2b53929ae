//! Running the dry runs: `epx_trace` and `epx_xdp_trace` loaded against the daemon's
//! pinned maps, a packet run through them with BPF_PROG_TEST_RUN, and the TRACE record they
//! leave read back.

use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::SchedClassifier;
use proxy_common::{
    Address, FrontendKey, Ipv6, ServiceName, TRACE_PROGRAM_NAME, TraceRecord,
    XDP_TRACE_PROGRAM_NAME, map_names, trace_ct,
};

use super::lookups::report_of;
use super::{TracePacket, TraceReport};
use crate::inspect::load_beside_pins;
use crate::inspect::trace_hooks::{Arrival, Hook, XdpView};

/// `epx_trace` and `epx_xdp_trace`, loaded against the pinned maps of a bpffs root.
pub struct Tracer {
    ebpf: Ebpf,
}

impl Tracer {
    /// Loads the dry runs from the embedded object, reusing the maps pinned under `root`
    /// (it never creates pins: missing ones are an error). Needs root (or CAP_BPF).
    pub fn load(root: &Path) -> Result<Self> {
        // Each family's maps the daemon writes, and the datapath's.
        let pins: Vec<&str> = u32::MAPS
            .all()
            .into_iter()
            .chain(Ipv6::MAPS.all())
            .chain([
                map_names::CONNTRACK,
                map_names::CONNTRACK_PENDING,
                map_names::CONNTRACK6,
                map_names::CONNTRACK_PENDING6,
                map_names::AFFINITY,
                map_names::AFFINITY6,
                map_names::FRAGMENTS,
                map_names::CT_TIMEOUTS,
                map_names::STATS,
                map_names::MEMBERSHIP_EPOCH,
                map_names::DEVICES,
            ])
            .collect();
        let mut ebpf =
            load_beside_pins(root, &pins, &[TRACE_PROGRAM_NAME, XDP_TRACE_PROGRAM_NAME])?;
        for program in [
            proxy_common::TRACE6_PROGRAM_NAME,
            proxy_common::XDP_TRACE6_PROGRAM_NAME,
        ] {
            crate::datapath::load_ipv6_path(
                &mut ebpf,
                program,
                proxy_common::tail_call::IPV6_TRACE,
            )?;
        }
        Ok(Self { ebpf })
    }

    /// Runs `packet` through tc's dry run (arriving on the test run's loopback) and
    /// explains the outcome.
    pub fn run(&mut self, packet: &TracePacket) -> Result<TraceReport> {
        self.run_hooks(packet, Hook::Tc, None)
    }

    /// Runs `packet` through the dry runs `hook` asks for, as arriving on `arrival`, and
    /// explains the outcome of the one that decided.
    pub fn run_hooks(
        &mut self,
        packet: &TracePacket,
        hook: Hook,
        arrival: Option<&Arrival>,
    ) -> Result<TraceReport> {
        let ifindex = arrival.map_or(0, |arrival| arrival.ifindex);
        let through_xdp = match hook {
            Hook::Auto => arrival.is_some_and(|arrival| arrival.xdp.is_some()),
            Hook::Xdp => true,
            Hook::Tc => false,
        };
        let frame = packet.frame();
        let mut xdp = None;
        if through_xdp {
            self.clear_record()?;
            let run = crate::xdp::run_frame(self.xdp_program()?, &frame, ifindex)
                .context("running epx_xdp_trace")?;
            let record = self.record()?;
            let view = XdpView::of(&run, &record, ifindex);
            if !view.left_to_tc() || hook == Hook::Xdp {
                let verdict = view.verdict();
                let mut report = self.explain(packet, run.action, &run.frame, &record)?;
                report.verdict = verdict.to_owned();
                return Ok(report.via_xdp(view, arrival));
            }
            xdp = Some(view);
        }
        let (return_code, output) = self.run_frame_on(&frame, ifindex)?;
        let record = self.record()?;
        let report = self.explain(packet, return_code, &output, &record)?;
        Ok(match xdp {
            Some(view) => report.via_xdp(view, arrival),
            None => report.on(arrival),
        })
    }

    /// The report of a run that left `output` and `record`.
    fn explain(
        &mut self,
        packet: &TracePacket,
        return_code: u32,
        output: &[u8],
        record: &TraceRecord,
    ) -> Result<TraceReport> {
        if packet.is_ipv6() {
            self.explain_as::<Ipv6>(packet, return_code, output, record)
        } else {
            self.explain_as::<u32>(packet, return_code, output, record)
        }
    }

    /// [`Tracer::explain`] for a packet of the family of `A`: its names from its family's
    /// SVC_NAMES.
    fn explain_as<A: Address>(
        &self,
        packet: &TracePacket,
        return_code: u32,
        output: &[u8],
        record: &TraceRecord,
    ) -> Result<TraceReport> {
        let traced = A::traced(record);
        let name_of = |rev_nat_id: u32| service_name::<A>(&self.ebpf, rev_nat_id);
        let frontend_name = if traced.frontend == FrontendKey::default() {
            None
        } else {
            name_of(record.service.rev_nat_id)?
        };
        let flow_name = if record.conntrack == trace_ct::NONE {
            None
        } else {
            name_of(traced.flow.rev_nat_id)?
        };
        Ok(report_of::<A>(
            packet,
            return_code,
            output,
            record,
            frontend_name,
            flow_name,
        ))
    }

    /// Runs a raw frame through `epx_trace`: its return value and the frame it leaves.
    pub fn run_frame(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        self.run_frame_on(frame, 0)
    }

    /// Runs a raw frame through `epx_xdp_trace` (arriving on the test run's loopback).
    pub fn run_xdp_frame(&mut self, frame: &[u8]) -> Result<crate::xdp::XdpRun> {
        self.clear_record()?;
        crate::xdp::run_frame(self.xdp_program()?, frame, 0).context("running epx_xdp_trace")
    }

    /// [`Tracer::run_frame`] as arriving on `ifindex` (0: loopback).
    fn run_frame_on(&mut self, frame: &[u8], ifindex: u32) -> Result<(u32, Vec<u8>)> {
        self.clear_record()?;
        let program: &SchedClassifier = self
            .ebpf
            .program(TRACE_PROGRAM_NAME)
            .context("epx_trace not loaded")?
            .try_into()?;
        crate::datapath::run_frame_on(program, frame, ifindex).context("running epx_trace")
    }

    fn xdp_program(&self) -> Result<&aya::programs::Xdp> {
        Ok(self
            .ebpf
            .program(XDP_TRACE_PROGRAM_NAME)
            .context("epx_xdp_trace not loaded")?
            .try_into()?)
    }

    fn clear_record(&mut self) -> Result<()> {
        clear_record(&mut self.ebpf)
    }

    fn record(&mut self) -> Result<TraceRecord> {
        record(&mut self.ebpf, TRACE_PROGRAM_NAME)
    }
}

fn trace_map(ebpf: &mut Ebpf) -> Result<PerCpuArray<&mut MapData, TraceRecord>> {
    let map = ebpf
        .map_mut(map_names::TRACE)
        .context("TRACE missing from the object")?;
    Ok(map.try_into()?)
}

/// Zeroes every CPU's TRACE record, so the run's CPU is the only one marked `recorded`.
pub(in crate::inspect) fn clear_record(ebpf: &mut Ebpf) -> Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(_, error)| error)?;
    let zeroes = PerCpuValues::try_from(vec![TraceRecord::default(); cpus])?;
    trace_map(ebpf)?.set(0, zeroes, 0)?;
    Ok(())
}

/// The TRACE record the dry run `program` left.
pub(in crate::inspect) fn record(ebpf: &mut Ebpf, program: &str) -> Result<TraceRecord> {
    let records = trace_map(ebpf)?.get(&0, 0)?;
    let recorded: Vec<&TraceRecord> = records.iter().filter(|r| r.recorded == 1).collect();
    match recorded.as_slice() {
        [record] => Ok(**record),
        [] => bail!("{program} left no record (did the program run?)"),
        _ => bail!("{program} left more than one record"),
    }
}

/// The Service port named for `rev_nat_id` in the SVC_NAMES of family `A` (SVC_NAMES6 for
/// IPv6) of a loaded object.
pub(in crate::inspect) fn service_name<A: Address>(
    ebpf: &Ebpf,
    rev_nat_id: u32,
) -> Result<Option<String>> {
    let map = A::MAPS.svc_names;
    let names: BpfHashMap<&MapData, u32, ServiceName> = ebpf
        .map(map)
        .with_context(|| format!("{map} missing from the object"))?
        .try_into()?;
    Ok(names
        .get(&rev_nat_id, 0)
        .ok()
        .as_ref()
        .map(crate::inspect::service_port_name))
}
