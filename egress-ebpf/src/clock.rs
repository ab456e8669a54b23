//! The coarse monotonic clock of the per-packet path (see `egress_common::clock`).

use aya_ebpf::{
    btf_maps::PerCpuArray,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::btf_map,
};
use egress_common::clock::TickClock;

#[btf_map]
static CLOCK: PerCpuArray<TickClock, 1> = PerCpuArray::new();

/// CLOCK_MONOTONIC in ns, up to a tick behind: what `bpf_ktime_get_coarse_ns` returns, read
/// through this CPU's clock of the current tick.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper call without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(c) = CLOCK.get_ptr_mut(0) else {
        return coarse();
    };
    // SAFETY: this CPU's slot, valid for the program's run. Programs do not nest on a CPU; a
    // torn pair (only possible if they did) would pair a tick with an older reading: still a
    // past time of the monotonic clock.
    unsafe {
        if (*c).jiffies == jiffies && (*c).ns != 0 {
            return (*c).ns;
        }
        let ns = coarse();
        *c = TickClock { jiffies, ns };
        ns
    }
}

#[inline(always)]
fn coarse() -> u64 {
    // SAFETY: a helper call without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}
