//! Reading a hash map the daemon rewrites in place (SERVICES, MEMBERSHIP, DEVICES).
//!
//! The kernel updates an existing key by linking a new element and freeing the old one
//! for reuse at once, not after an RCU grace period: a preallocated map keeps it as this
//! CPU's spare for its next update of an existing key (`alloc_htab_elem`, `extra_elems`),
//! and a `BPF_F_NO_PREALLOC` map returns it to bpf_mem_alloc's per-CPU free list, whose
//! next allocation takes it (`unit_free` / `unit_alloc` in kernel/bpf/memalloc.c). So
//! neither kind of map keeps a found element's contents stable: a program that found a
//! frontend's header could copy, a microsecond later, the header of the next frontend the
//! same batch rewrote into that element.
//!
//! [`read`] copies the value and then looks the key up again: if the element linked at
//! the key is still the one copied, the copy was of this key (the element moved on only if
//! the key was updated meanwhile, and then it is no longer linked here); else it copies
//! again from the new element.

use aya_ebpf::maps::HashMap;

/// How many times [`read`] copies before it takes its latest copy: each retry needs
/// the key rewritten once more during one copy of a few dozen bytes.
const COPIES: u32 = 3;

/// The value at `key` in `map`, copied from an element that was still linked at `key`
/// after the copy.
#[inline(always)]
pub fn read<K, V: Copy>(map: &HashMap<K, V>, key: &K) -> Option<V> {
    let mut value = None;
    copy_linked(map, key, |element| value = Some(*element)).then_some(value)?
}

/// [`read`] into `into` (the IPv6 path's scratch memory, where a copy on the stack would
/// crowd its frames); whether there was a value. `into` is left as it was if not.
#[inline(always)]
pub fn read_into<K, V: Copy>(map: &HashMap<K, V>, key: &K, into: &mut V) -> bool {
    copy_linked(map, key, |element| *into = *element)
}

/// Calls `copy` with the element at `key`, again while the element linked at `key` after
/// the copy is another one (at most [`COPIES`] times); false when there is none.
#[inline(always)]
fn copy_linked<K, V>(map: &HashMap<K, V>, key: &K, mut copy: impl FnMut(&V)) -> bool {
    let Some(mut element) = map.get_ptr(key) else {
        return false;
    };
    let mut copies = 1;
    loop {
        // SAFETY: a map element stays mapped for the whole program run (RCU); its contents
        // may change under us, which the lookup below detects.
        copy(unsafe { &*element });
        // The helper call is opaque to the compiler, so the copy's loads stay before it.
        let Some(linked) = map.get_ptr(key) else {
            return false;
        };
        if core::ptr::eq(linked, element) || copies == COPIES {
            return true;
        }
        element = linked;
        copies += 1;
    }
}
