//! Per-CPU packet and byte counters, indexed by [`Stat`].
use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use egress_common::stats::{Counter, STATS_CAPACITY, Stat};

#[btf_map]
static STATS: PerCpuArray<Counter, { STATS_CAPACITY as usize }> = PerCpuArray::new();

/// Adds one packet of `bytes` to counter `stat` on this CPU. Per-CPU slots need no atomics.
#[inline(always)]
pub fn count(stat: Stat, bytes: u32) {
    if let Some(c) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: the pointer is this CPU's slot, valid for the program's run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
}

/// Adds `n` events to counter `stat` on this CPU (no bytes: for events that are not packets).
#[inline(always)]
pub fn add(stat: Stat, n: u64) {
    if let Some(c) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: this CPU's slot, valid for the program's run.
        unsafe { (*c).packets += n };
    }
}
