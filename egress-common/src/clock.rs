//! The programs' clock: CLOCK_MONOTONIC at a tick's resolution, as `bpf_ktime_get_coarse_ns`
//! gives it, read once per tick per CPU.
//!
//! The helper is a call, measured at about 30 ns per packet on the benchmark's machine (a
//! third of a translation's cost). The coarse clock only moves when the tick does, and so does
//! `jiffies`, which `bpf_jiffies64` reads in one load (the verifier inlines it on 64-bit JITs).
//! Each CPU keeps the clock it read at the current tick and reads the helper again only when
//! `jiffies` has moved on: at most a tick behind, as the coarse clock itself is.

/// One CPU's clock of the current tick (the value of the per-CPU `CLOCK` map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickClock {
    /// `jiffies` when `ns` was read (0: never read).
    pub jiffies: u64,
    /// `bpf_ktime_get_coarse_ns()` at that tick.
    pub ns: u64,
}
const _: () = assert!(core::mem::size_of::<TickClock>() == 16);
