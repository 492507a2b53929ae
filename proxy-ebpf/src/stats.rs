//! Per-CPU packet counters, indexed by `proxy_common::stat`; userspace sums the CPUs.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use proxy_common::stat;

/// Named like `proxy_common::map_names::STATS`; pinned so the daemon and CLI reuse it.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);

/// Adds one to `counter` (a `proxy_common::stat` index). Per-CPU slots need no atomics.
#[inline(always)]
pub fn count(counter: u32) {
    if let Some(value) = STATS.get_ptr_mut(counter) {
        // SAFETY: the pointer comes from a successful lookup and this CPU's slot is only
        // written by this CPU, with preemption disabled while the program runs.
        unsafe { *value += 1 };
    }
}
