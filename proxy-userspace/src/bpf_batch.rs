//! Batched map operations, which aya 0.14 does not wrap: `BPF_MAP_LOOKUP_BATCH` (reading a
//! hash map a few thousand entries per system call instead of two calls per entry: the
//! conntrack garbage collector, listings, fill levels) and `BPF_MAP_UPDATE_BATCH` /
//! `BPF_MAP_DELETE_BATCH` (the writer: one call for thousands of entries). The kernel
//! applies an update or delete batch's elements one after the other, in order, and stops at
//! the first that fails, saying how many it applied; so such a batch is exactly the
//! sequence of single writes it replaces, minus the system calls. The one unsafe call of
//! all of them lives here.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use aya::Pod;
use aya::maps::MapData;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
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

/// One batch command. The kernel reads the arrays `attr` points to (and, for a lookup,
/// writes them and the cursor) and sets `attr.count` to the elements it handled.
fn call(command: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` and the buffers it points to outlive the call; every caller sizes the
    // key and value buffers for `attr.count` entries of the map's key and value types
    // (aya checked their sizes when it opened the map).
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn fd_of(map: &MapData) -> u32 {
    map.fd().as_fd().as_raw_fd() as u32
}

/// A batch that stopped early: how many elements were applied before `error`, which the
/// next element met.
#[derive(Debug)]
pub struct Stopped {
    pub applied: usize,
    pub error: io::Error,
}

/// Writes `keys[i]` → `values[i]` in order (`BPF_ANY`). `K` and `V` must be the map's key
/// and value types.
pub fn update<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> Result<(), Stopped> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    write(BPF_MAP_UPDATE_BATCH, map, keys, values.as_ptr() as u64)
}

/// Deletes `keys` in order. A key that is not there stops the batch like any error
/// (`ENOENT`); the caller decides whether that matters.
pub fn delete<K: Pod>(map: &MapData, keys: &[K]) -> Result<(), Stopped> {
    write(BPF_MAP_DELETE_BATCH, map, keys, 0)
}

fn write<K: Pod>(
    command: libc::c_long,
    map: &MapData,
    keys: &[K],
    values: u64,
) -> Result<(), Stopped> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values,
        count: u32::try_from(keys.len()).expect("a batch of more than 4 billion entries"),
        map_fd: fd_of(map),
        ..BatchAttr::default()
    };
    call(command, &mut attr).map_err(|error| Stopped {
        error,
        // The kernel reports how many it applied; never more than it was given.
        applied: (attr.count as usize).min(keys.len()),
    })
}

/// How many entries `map` (a hash map of `K` → `V`) holds: the kernel keeps no count.
pub fn count_entries<K: Pod, V: Pod>(map: &MapData) -> io::Result<u64> {
    let mut entries = 0;
    for_each_entry(map, 4096, |_: &K, _: &V| {
        entries += 1;
        Ok(())
    })?;
    Ok(entries)
}

/// Calls `each` with every entry of `map` (a hash map of `K` → `V`), `chunk` at a time.
/// Entries added or removed during the walk may or may not be seen, as with any walk of a
/// live map; removing entries `each` was given is safe.
pub fn for_each_entry<K: Pod, V: Pod>(
    map: &MapData,
    chunk: usize,
    mut each: impl FnMut(&K, &V) -> io::Result<()>,
) -> io::Result<()> {
    let mut chunk = chunk.max(1);
    let mut keys = vec![zeroed::<K>(); chunk];
    let mut values = vec![zeroed::<V>(); chunk];
    // For hash maps the cursor is a bucket index.
    let mut cursor: u32 = 0;
    let mut first = true;
    loop {
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const cursor) as u64 },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd_of(map),
            ..BatchAttr::default()
        };
        let error = call(BPF_MAP_LOOKUP_BATCH, &mut attr).err();
        match error.as_ref().and_then(io::Error::raw_os_error) {
            // A bucket holds more entries than fit: retry it with more room.
            Some(libc::ENOSPC) => {
                chunk *= 2;
                keys.resize(chunk, zeroed());
                values.resize(chunk, zeroed());
                continue;
            }
            Some(libc::ENOENT) | None => {}
            Some(_) => return Err(error.expect("an error")),
        }
        let filled = attr.count as usize;
        for (key, value) in keys[..filled].iter().zip(&values[..filled]) {
            each(key, value)?;
        }
        if error.is_some() {
            // ENOENT: the walk is complete.
            return Ok(());
        }
        cursor = next;
        first = false;
    }
}

/// An all-zero value, valid for any map type (they are plain old data).
fn zeroed<T: Pod>() -> T {
    // SAFETY: `Pod` types are plain integers and arrays of them: all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}
