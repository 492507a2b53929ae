//! The metadata maps: SVC_NAMES (which Service port each frontend belongs to) and LAYOUT.
//!
//! Packets never read them; the maps live in the object so the daemon creates and pins
//! them with the others (same object, same bpffs root) and the CLI finds them there. The
//! `#[map]` export keeps them in the object although no program references them.

use aya_ebpf::{bindings::BPF_F_NO_PREALLOC, macros::map, maps::HashMap};
use proxy_common::{LayoutName, ServiceName, default_max_entries};

/// Named like `proxy_common::map_names::SVC_NAMES`; key: a frontend's `rev_nat_id`.
/// Written only by the daemon and seldom, so it is allocated entry by entry instead of
/// reserving memory for its whole capacity up front.
#[map]
static SVC_NAMES: HashMap<u32, ServiceName> =
    HashMap::pinned(default_max_entries::SVC_NAMES, BPF_F_NO_PREALLOC);

/// Named like `proxy_common::map_names::LAYOUT`: the layout version of every pinned map,
/// written by the daemon (see proxy-userspace's `layout` module). Room for far more maps
/// than the object has.
#[map]
static LAYOUT: HashMap<LayoutName, u32> = HashMap::pinned(64, BPF_F_NO_PREALLOC);
