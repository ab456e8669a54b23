//! Planned actions: what this server does with a new connection of a pool, per family.

/// Address families as stored in map keys.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Key of `ACTIONS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActionKey {
    pub pool: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: [u8; 3],
    /// Plan generation ([`crate::generation`]). A field of its own, not a byte of the old
    /// padding: the key's size changes, so a map pinned by an earlier version is never adopted
    /// as if it were this layout (its entries would read as generation 0).
    pub gen_: u32,
}
const _: () = assert!(core::mem::size_of::<ActionKey>() == 12);

impl ActionKey {
    pub const fn new(pool: u32, family: u8) -> Self {
        Self::in_gen(pool, family, 0)
    }
    pub const fn in_gen(pool: u32, family: u8, generation: u8) -> Self {
        Self {
            pool,
            family,
            _pad: [0; 3],
            gen_: generation as u32,
        }
    }
}

/// What to do with new connections of a pool.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionKind {
    /// Translate here to one of `snat`.
    Snat = 1,
    /// Nobody can carry the pool: drop, counted.
    Drop = 2,
    /// Encapsulate new connections to one of `hops` (by flow hash).
    Forward = 3,
}

impl ActionKind {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Snat),
            2 => Some(Self::Drop),
            3 => Some(Self::Forward),
            _ => None,
        }
    }
}

/// One pool address and the port range of it this server may hand out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatTarget {
    /// IPv4 in the first 4 bytes (rest zero), or IPv6; network order.
    pub addr: [u8; 16],
    /// Inclusive range, host order.
    pub port_min: u16,
    pub port_max: u16,
}
const _: () = assert!(core::mem::size_of::<SnatTarget>() == 20);

/// Most SNAT targets one action carries (shares of one pool on one server).
pub const MAX_SNAT: usize = 4;
const _: () = assert!(
    MAX_SNAT.is_power_of_two(),
    "the BPF side masks indexes with MAX_SNAT - 1"
);

/// Most next hops one forwarding action carries.
pub const MAX_HOPS: usize = 16;
const _: () = assert!(
    MAX_HOPS.is_power_of_two(),
    "the BPF side masks indexes with MAX_HOPS - 1"
);

/// Value of `ACTIONS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Action {
    /// An [`ActionKind`].
    pub kind: u8,
    /// Valid entries in `snat`.
    pub snat_count: u8,
    /// Valid entries in `hops`.
    pub hop_count: u8,
    pub _pad: u8,
    pub snat: [SnatTarget; MAX_SNAT],
    /// Fabric IPv4 addresses of the peers to forward to, network order.
    pub hops: [[u8; 4]; MAX_HOPS],
}
const _: () = assert!(core::mem::size_of::<Action>() == 148);

/// Entries of `ACTIONS` (one per pool and family; not preallocated).
pub const ACTIONS_CAPACITY: u32 = 524_288;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields and arrays only, explicit padding (sizes asserted above).
    unsafe impl aya::Pod for super::ActionKey {}
    unsafe impl aya::Pod for super::Action {}
    unsafe impl aya::Pod for super::SnatTarget {}
}
