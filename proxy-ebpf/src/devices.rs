//! Which devices are pods': where a new connection comes from, for the frontends that
//! treat pods apart (the Cluster set of an externalTrafficPolicy Local frontend). The
//! daemon names every device it attaches to in DEVICES; kube-proxy tells the same apart
//! with its local-traffic detector (`--detect-local-mode=InterfaceNamePrefix`).

use aya_ebpf::{macros::map, maps::HashMap};
use proxy_common::{Origin, default_max_entries, device_kind};

use crate::recycled;

/// Named like `proxy_common::map_names::DEVICES`; written by the daemon as it attaches
/// (again at a restart, in place: read through [`recycled::read`]).
#[map]
static DEVICES: HashMap<u32, u8> = HashMap::pinned(default_max_entries::DEVICES, 0);

/// The origin of a packet that arrived on `ifindex`: a pod's device, or anything else
/// (an external device, or one the daemon did not name: treated as outside, which keeps
/// the frontend's own traffic policy).
#[inline(always)]
pub fn origin_of(ifindex: u32) -> Origin {
    match recycled::read(&DEVICES, &ifindex) {
        Some(device_kind::POD) => Origin::Pod,
        _ => Origin::Outside,
    }
}
