//! How the daemon uses glibc's allocator, so that its resident set follows what it holds.
//!
//! Measured at 10 000 Services × 10 endpoints (`cargo xtask bench --only memory`): with
//! glibc's defaults, each thread that parses a manifest gets its own arena (up to eight a
//! core), the records it allocates live on among the parser's freed temporaries, and those
//! arenas' pages stay resident; and after a large buffer is freed, glibc raises its mmap
//! threshold up to 32 MiB, so the next file's text lands in an arena too and fragments it.
//! One arena and a fixed threshold keep the heap dense and large buffers in their own
//! mappings, which go back to the system when freed; after a sync that changed much,
//! [`return_freed_memory`] hands back the free pages inside the heap as well.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

/// Buffers from this size up get a mapping of their own (glibc's default start, fixed).
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Sets the allocator up for the daemon. Call it first, before any thread starts.
pub fn configure() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets the allocator's parameters; no allocation is live across it
    // that depends on them, and no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Returns the free pages of the heap to the system. After a big change (a large file
/// parsed, a relist, many Services gone) the allocator keeps them, where RSS still counts
/// them.
pub fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Drops the resident pages of `bytes`, data embedded in the binary's read-only segment
/// (the eBPF object, 3.5 MB with its debug sections), once it has been read: parsing it
/// touches nearly every page, and a mapped page of the binary counts in RSS until the
/// process drops it. The kernel reads a page back from the binary if it is read again.
/// Only the pages wholly inside `bytes` are dropped.
pub fn release_embedded(bytes: &'static [u8]) {
    // SAFETY: sysconf only reads a constant of the system.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let start = (bytes.as_ptr() as usize).next_multiple_of(page);
    let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
    if end > start {
        // SAFETY: the range lies inside a `'static` byte slice the linker put in a read-only
        // file mapping of the binary (nothing in it is ever written, nor relocated at load),
        // so dropping its pages loses nothing: they read back from the file unchanged.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
        }
    }
}

/// Tables at most this large keep their buckets: a resize costs more than they hold.
const SMALL_TABLE: usize = 1024;

/// Gives a hash table's unused buckets back once most of its entries have gone (a large
/// file removed, a relist that dropped thousands of objects): hash tables never shrink on
/// their own, so at 100 000 Services the empty tables of the model, planner and writer
/// held tens of megabytes. O(1) when there is nothing to do.
pub fn shrink_sparse<K: Eq + Hash, V, S: BuildHasher>(table: &mut HashMap<K, V, S>) {
    if table.capacity() > SMALL_TABLE && table.len() * 4 < table.capacity() {
        table.shrink_to_fit();
    }
}
