//! ebpf-proxy userspace: the daemon that keeps the eBPF maps equal to the cluster's
//! Services and EndpointSlices, and the node-admin CLI that reads them.
//!
//! Control path, one module a stage, each change carried as far as it reaches:
//! [`source`] (manifests directory or API server watchers: per-object changes) → [`model`]
//! (compact records; marks the touched Services dirty) → [`plan`] (pure; re-plans the dirty
//! Services, emits the frontends whose plan changed) → [`writer`] (writes those frontends,
//! backends reference-counted; the only code that touches the maps). [`datapath`] loads,
//! pins and attaches the kernel programs; [`netlink`] reads node addresses and follows pod
//! interfaces; [`socket_lb`] attaches the socket programs to the cgroup hierarchy;
//! [`health`] and [`service_health`] answer probes (the proxy's and each
//! externalTrafficPolicy=Local Service's healthCheckNodePort); [`conntrack`] sweeps idle
//! flows; [`daemon`] wires it all together ([`allocator`] keeps its memory dense). [`inspect`]
//! gives node admins views of the pinned maps.

pub mod allocator;
pub mod bpf_batch;
pub mod conntrack;
pub mod daemon;
pub mod datapath;
pub mod health;
pub mod inspect;
pub mod layout;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod node_port_addresses;
pub mod pin_root;
pub mod plan;
pub mod service_health;
pub mod socket_lb;
pub mod source;
pub mod writer;
pub mod xdp;

/// The kernel programs, built from proxy-ebpf by build.rs. A static, so the binary holds one
/// copy of it (as a `const`, each crate using it got its own) and
/// [`allocator::release_embedded`] drops the very pages that were read.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));
