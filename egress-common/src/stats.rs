//! Per-CPU counters: one slot per [`Stat`], each counting packets and bytes.

/// Value of one slot of the `STATS` per-CPU array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(feature = "user")]
// SAFETY: repr(C), two u64s, no padding.
unsafe impl aya::Pod for Counter {}

/// Slots reserved in the `STATS` map. Fixed, larger than the number of counters, so that a newer
/// agent can adopt an older pinned map without recreating it.
pub const STATS_CAPACITY: u32 = 64;

macro_rules! stats {
    ($( $(#[doc = $doc:literal])* $variant:ident = $idx:literal => $name:literal, )*) => {
        /// Index of every counter the datapath keeps. The one list used by both sides: the
        /// programs count with it, the agent names and exports with it.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Stat {
            $( $(#[doc = $doc])* $variant = $idx, )*
        }

        impl Stat {
            /// Every counter, in index order.
            pub const ALL: &'static [Stat] = &[$(Stat::$variant,)*];

            /// Stable snake_case name, used in `egress stats` and metrics.
            pub const fn name(self) -> &'static str {
                match self { $(Stat::$variant => $name,)* }
            }

            /// One-line description for `egress stats` and metric help.
            pub const fn help(self) -> &'static str {
                match self { $(Stat::$variant => concat!($($doc,)*),)* }
            }
        }
    };
}

stats! {
    /// Packets seen by the TC egress program.
    EgressSeen = 0 => "egress_seen",
    /// Packets seen by the TC ingress program.
    IngressSeen = 1 => "ingress_seen",
}

const _: () = assert!((Stat::ALL.len() as u32) <= STATS_CAPACITY);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn indexes_are_dense_and_names_unique() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?} is out of order");
            assert!(!s.help().is_empty(), "{s:?} has no help");
        }
        let mut names: std::vec::Vec<_> = Stat::ALL.iter().map(|s| s.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Stat::ALL.len(), "duplicate counter names");
    }
}
