//! Reading a hash map in batches (BPF_MAP_LOOKUP_BATCH), which aya 0.14 does not wrap: a
//! few thousand entries per system call instead of two calls per entry. The one unsafe
//! call lives here.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use aya::Pod;
use aya::maps::MapData;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

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
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` and the buffers it points to live across the call, and the
        // buffers hold `count` keys and values of the map's sizes (K and V are the map's
        // key and value types).
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let error = (result < 0).then(io::Error::last_os_error);
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
