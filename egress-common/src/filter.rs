//! The pass filter: destinations that can have no policy and no flow entry, one bit per
//! *bucket* of destination addresses, so that `tc_egress` passes the bulk of a server's
//! traffic (to everyone but the customers' origins) with one array read instead of a flow
//! lookup and a policy lookup — and `tc_ingress` and `xdp_ingress` the bulk of what it receives
//! (to anything but a pool address), instead of a flow lookup and an owner lookup.
//!
//! A bucket is an IPv4 /20 (the address's first 20 bits), or, for IPv6, a hash of the
//! address's first 32 bits into 20 bits. The map `PASS_FILTER` holds one bit per bucket,
//! IPv4 buckets first: set means "no policy prefix, pool address (translated to or shared)
//! or live flow entry has a destination in this bucket". A new map is all zeros (nothing passes early: every packet
//! takes the rules' full path), so a filter the agent has not written yet is never wrong,
//! only slow; an agent clears an adopted one at start, whoever left it.

use crate::action::FAMILY_V4;

/// Buckets per family (2^20).
pub const BUCKET_BITS: u32 = 20;
/// Buckets of one family.
pub const BUCKETS: u32 = 1 << BUCKET_BITS;
/// 64-bit words of `PASS_FILTER`: both families.
pub const WORDS: u32 = 2 * BUCKETS / 64;
/// Multiplier of the IPv6 bucket hash (Fibonacci hashing: the top bits of the product mix
/// every bit of the /32).
pub const V6_MULTIPLIER: u32 = 0x9E37_79B1;

/// The bucket of IPv4 address `hi` (host order): its /20.
#[inline(always)]
pub const fn bucket_v4(hi: u32) -> u32 {
    hi >> (32 - BUCKET_BITS)
}

/// The bucket of an IPv6 address whose first 32 bits (host order) are `hi`.
#[inline(always)]
pub const fn bucket_v6(hi: u32) -> u32 {
    BUCKETS | (hi.wrapping_mul(V6_MULTIPLIER) >> (32 - BUCKET_BITS))
}

/// The bucket (0..2 × [`BUCKETS`]) of destination `dst` (IPv4 in the first 4 bytes).
#[inline(always)]
pub fn bucket(family: u8, dst: &[u8; 16]) -> u32 {
    let hi = u32::from_be_bytes([dst[0], dst[1], dst[2], dst[3]]);
    if family == FAMILY_V4 {
        bucket_v4(hi)
    } else {
        bucket_v6(hi)
    }
}

/// The word of `PASS_FILTER` holding bucket `b`, and the bit in it.
#[inline(always)]
pub const fn word_bit(b: u32) -> (u32, u32) {
    (b / 64, b % 64)
}

const _: () = assert!(WORDS == 32768);
const _: () = assert!(bucket_v6(u32::MAX) < 2 * BUCKETS && bucket_v4(u32::MAX) < BUCKETS);
