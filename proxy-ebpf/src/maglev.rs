//! Maglev consistent hashing (`ebpf-proxy.io/lb-algorithm: maglev`, `--lb-algorithm`): a
//! new flow's backend is the one at `flow_hash(client) % size` of its frontend's table,
//! which the daemon computes from the backends (the same on every node) and writes before
//! the header that names it. See `proxy_common::maglev`.

use core::num::NonZeroU32;

use aya_ebpf::{bindings::BPF_F_NO_PREALLOC, macros::map, maps::HashMap};
use proxy_common::{
    FrontendValue, default_max_entries,
    maglev::{CHUNK_POSITIONS, MaglevChunk, MaglevKey, client_flow_hash, table_size},
};

use crate::family::Family;

/// Named like `proxy_common::map_names::MAGLEV` (MAGLEV6, in `lb6`, holds IPv6 frontends'
/// tables); pinned, written by the daemon. Not
/// preallocated: only the tables that exist take memory.
#[map]
pub(crate) static MAGLEV: HashMap<MaglevKey, MaglevChunk> =
    HashMap::pinned(default_max_entries::MAGLEV, BPF_F_NO_PREALLOC);

/// A flow's client as the table's hash takes it: address, port (wire order), protocol.
#[derive(Clone, Copy)]
pub struct Flow<A = u32> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
}

/// The index in `header`'s own set that its Maglev table gives `flow`; `None` when the
/// header names no table, or its entry is gone (the daemon writes a table before the
/// header that names it, and removes it after the header moved on: only a packet that read
/// the header a moment before can miss it; the caller then chooses at random).
#[inline(always)]
pub fn index<A: Family>(header: &FrontendValue, flow: Flow<A>) -> Option<u16> {
    let size = NonZeroU32::new(table_size(header.maglev)?)?;
    let position = client_flow_hash(flow.addr, flow.port, flow.proto) % size;
    let key = MaglevKey {
        base: header.base,
        maglev: header.maglev,
        _pad: 0,
        chunk: position / CHUNK_POSITIONS as u32,
    };
    // SAFETY: the value is copied out at once.
    let chunk = unsafe { A::maglev().get(&key) }?;
    chunk
        .positions
        .get(position as usize % CHUNK_POSITIONS)
        .copied()
}
