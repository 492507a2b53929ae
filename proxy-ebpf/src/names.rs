//! The SVC_NAMES map: which Service port each frontend belongs to.
//!
//! Packets never need names; the map lives in the object so the daemon creates and pins
//! it with the others (same object, same bpffs root) and the CLI finds it there. The
//! `#[map]` export keeps it in the object although no program references it.

use aya_ebpf::{bindings::BPF_F_NO_PREALLOC, macros::map, maps::HashMap};
use proxy_common::{ServiceName, default_max_entries};

/// Named like `proxy_common::map_names::SVC_NAMES`; key: a frontend's `rev_nat_id`.
/// Written only by the daemon and seldom, so it is allocated entry by entry instead of
/// reserving memory for its whole capacity up front.
#[map]
static SVC_NAMES: HashMap<u32, ServiceName> =
    HashMap::pinned(default_max_entries::SVC_NAMES, BPF_F_NO_PREALLOC);
