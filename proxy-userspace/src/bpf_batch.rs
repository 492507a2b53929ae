//! Batched map writes (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`), which aya 0.14 does
//! not wrap: one system call for thousands of entries instead of one each. The kernel
//! applies a batch's elements one after the other, in order, and stops at the first that
//! fails, saying how many it applied; so a batch is exactly the sequence of single writes
//! it replaces, minus the system calls. The one unsafe call of the writer lives here.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use aya::Pod;
use aya::maps::MapData;

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A batch that stopped early: how many elements were applied before `error`, which the
/// next element met.
#[derive(Debug)]
pub struct Stopped {
    pub applied: usize,
    pub error: io::Error,
}

/// Writes `keys[i]` → `values[i]` in order (`BPF_ANY`). `K` and `V` must be the map's key
/// and value types (aya checked their sizes when it opened the map).
pub fn update<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> Result<(), Stopped> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    call(BPF_MAP_UPDATE_BATCH, map, keys, values.as_ptr().cast())
}

/// Deletes `keys` in order. A key that is not there stops the batch like any error
/// (`ENOENT`); the caller decides whether that matters.
pub fn delete<K: Pod>(map: &MapData, keys: &[K]) -> Result<(), Stopped> {
    call(BPF_MAP_DELETE_BATCH, map, keys, std::ptr::null())
}

fn call<K: Pod>(
    command: libc::c_long,
    map: &MapData,
    keys: &[K],
    values: *const u8,
) -> Result<(), Stopped> {
    if keys.is_empty() {
        return Ok(());
    }
    let count = u32::try_from(keys.len()).expect("a batch of more than 4 billion entries");
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values as u64,
        count,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` and the arrays it points to (`count` keys and, for updates, `count`
    // values of the map's sizes) live across the call; the kernel only reads the arrays
    // and writes `attr.count`.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            &raw mut attr,
            size_of::<BatchAttr>(),
        )
    };
    if result >= 0 {
        return Ok(());
    }
    Err(Stopped {
        error: io::Error::last_os_error(),
        // The kernel reports how many it applied; never more than it was given.
        applied: (attr.count as usize).min(keys.len()),
    })
}
