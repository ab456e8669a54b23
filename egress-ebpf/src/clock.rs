//! The coarse monotonic clock of the per-packet path (see `egress_common::clock`).

use aya_ebpf::{
    btf_maps::PerCpuArray,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::btf_map,
};
use egress_common::clock::TickClock;

#[btf_map]
static CLOCK: PerCpuArray<TickClock, 1> = PerCpuArray::new();

/// CLOCK_MONOTONIC in ns, as `bpf_ktime_get_coarse_ns` returns it, read through this CPU's
/// clock of the current tick: at most a tick behind the coarse clock (see
/// `egress_common::clock`).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper call without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(c) = CLOCK.get_ptr_mut(0) else {
        return coarse();
    };
    // SAFETY: this CPU's slot, valid for the program's run.
    unsafe {
        if (*c).jiffies == jiffies && (*c).ns != 0 {
            return (*c).ns;
        }
        let ns = coarse();
        // The kernel moves `jiffies` on a little before the coarse clock, at each tick: a
        // reading that has not moved since the cached one is kept under the old tick, so the
        // next packet asks again (and the tick does not run on the previous tick's time).
        if ns != (*c).ns {
            // The time first, the tick last: a program reading between the two stores (were
            // programs ever to nest on a CPU) finds the old tick and asks the helper itself.
            core::ptr::write_volatile(&raw mut (*c).ns, ns);
            core::ptr::write_volatile(&raw mut (*c).jiffies, jiffies);
        }
        ns
    }
}

#[inline(always)]
fn coarse() -> u64 {
    // SAFETY: a helper call without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}
