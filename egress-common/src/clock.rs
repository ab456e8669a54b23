//! The programs' clock: CLOCK_MONOTONIC at a tick's resolution, as `bpf_ktime_get_coarse_ns`
//! gives it, read once per tick per CPU.
//!
//! The helper is a call, measured at about 30 ns per packet on the benchmark's machine (a
//! third of a translation's cost). The coarse clock only moves when the tick does, and so does
//! `jiffies`, which `bpf_jiffies64` reads in one load (the verifier inlines it on 64-bit JITs).
//! Each CPU keeps the clock it read at the current tick and reads the helper again only when
//! `jiffies` has moved on.
//!
//! How far behind: the kernel moves `jiffies` on a little before the coarse clock at each
//! tick. A reading in between that equals the cached one is not kept (the next packet asks
//! again), but a CPU whose copy is older than the previous tick can keep the previous tick's
//! time for one tick: a stamp is at most a tick behind the coarse clock, which is itself up
//! to a tick behind CLOCK_MONOTONIC (so about two ticks, 8 ms at HZ=250, 20 ms at HZ=100).
//! Never ahead: every value is one the helper returned. The consumers' scales are far above
//! it (the entries' 100 ms refresh granule and second-long timeouts, the route cache's 1 s).
//!
//! Speed: the per-CPU map read is inlined by the verifier from kernel 6.10 on; before that it
//! is a helper call of its own and the saving smaller.

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
