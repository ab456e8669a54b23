//! The pass filter from userspace (`egress_common::filter`): which destination buckets may
//! have a policy or a flow entry, from the plan and the flow table.
//!
//! The programs pass a packet at once when its bucket's bit is set in `PASS_FILTER`, so the
//! one thing that must never happen is a set bit over a destination that has a policy or a
//! live flow entry. An agent clears the map when it loads (an adopted one may have been left
//! by another version or plan), and then two writes keep that:
//! - every plan switch first *admits* the new plan's buckets (clears their bits) before the
//!   plan goes in force ([`crate::apply::PlanTables::apply`]); it never sets a bit, so the
//!   buckets of a removed policy stay admitted while its connections may live on;
//! - a collection pass *refines* the filter to exactly the plan in force and the destinations
//!   of the entries it read, but only if no plan was written since it began reading (an entry
//!   made meanwhile was made under the plan in force; one made under an older plan existed
//!   when the pass began, so the pass saw it).

use aya::maps::{Array, MapData, MapError};
use egress_common::{
    action::{ActionKind, FAMILY_V4, FAMILY_V6},
    filter::{BUCKET_BITS, BUCKETS, WORDS, bucket, bucket_v4, bucket_v6, word_bit},
    policy::{MARK_BITS, POOL_BITS},
};

use crate::plan::MapContents;

/// Buckets that may have a policy or a flow entry ("maybe": the filter's bit must be clear).
#[derive(Clone, PartialEq, Eq)]
pub struct Buckets(Vec<u64>);

impl std::fmt::Debug for Buckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Buckets {{ v4: {}, v6: {} }}",
            self.count(FAMILY_V4),
            self.count(FAMILY_V6)
        )
    }
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets(vec![0; WORDS as usize])
    }
}

impl Buckets {
    fn set(&mut self, b: u32) {
        let (w, bit) = word_bit(b);
        self.0[w as usize] |= 1 << bit;
    }

    /// Buckets `first..first + count` (whole words at a time where it can).
    fn set_range(&mut self, first: u32, count: u32) {
        let mut b = first;
        let end = first + count;
        while b < end {
            if b.is_multiple_of(64) && end - b >= 64 {
                self.0[(b / 64) as usize] = u64::MAX;
                b += 64;
            } else {
                self.set(b);
                b += 1;
            }
        }
    }

    /// Whether bucket `b` is in.
    pub fn contains(&self, b: u32) -> bool {
        let (w, bit) = word_bit(b);
        self.0[w as usize] >> bit & 1 != 0
    }

    /// The bucket of destination `dst` of `family` (IPv4 in the first 4 bytes).
    pub fn add_addr(&mut self, family: u8, dst: &[u8; 16]) {
        self.set(bucket(family, dst));
    }

    /// Every bucket an IPv4 prefix of `len` bits at `addr` overlaps.
    pub fn add_v4_prefix(&mut self, addr: [u8; 4], len: u32) {
        let len = len.min(32);
        let base = u32::from_be_bytes(addr) & mask(len);
        if len >= BUCKET_BITS {
            self.set(bucket_v4(base));
        } else {
            self.set_range(bucket_v4(base), 1 << (BUCKET_BITS - len));
        }
    }

    /// Every bucket an IPv6 prefix of `len` bits at `addr` may hash to: the bucket of each /32
    /// it covers, or all IPv6 buckets when it covers more /32s than there are buckets.
    pub fn add_v6_prefix(&mut self, addr: [u8; 16], len: u32) {
        let len = len.min(128);
        let hi = u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]);
        if len >= 32 {
            self.set(bucket_v6(hi));
        } else if 32 - len > BUCKET_BITS {
            self.set_range(BUCKETS, BUCKETS);
        } else {
            let base = hi & mask(len);
            for i in 0..1u32 << (32 - len) {
                self.set(bucket_v6(base | i));
            }
        }
    }

    /// What `plan` may match or have translated to: every policy's prefix (any mark, any
    /// pool; a peer's connections go only to these too), every pool address it translates to
    /// (a reply-shaped packet to one meets its reverse entry, TC egress rule 3; a reply
    /// arriving, its reverse entry) and every shared pool address (a packet arriving for
    /// another server's ports is sent to it: soft-unicast).
    pub fn of_plan(plan: &MapContents) -> Buckets {
        let mut b = Buckets::default();
        for (len, k) in plan.policies_v4.keys() {
            b.add_v4_prefix(k.addr, len.saturating_sub(MARK_BITS));
        }
        for (len, k) in plan.policies_v6.keys() {
            b.add_v6_prefix(k.addr, len.saturating_sub(MARK_BITS));
        }
        for (len, k) in plan.peer_policies.keys() {
            b.add_v4_prefix(k.addr, len.saturating_sub(POOL_BITS));
        }
        for (k, a) in &plan.actions {
            if a.kind != ActionKind::Snat as u8 {
                continue;
            }
            for t in a.snat.iter().take(usize::from(a.snat_count)) {
                b.add_addr(k.family, &t.addr);
            }
        }
        for k in plan.owners.keys() {
            b.add_v4_prefix(k.addr, 32);
        }
        b
    }

    /// Adds every bucket of `other`.
    pub fn union(&mut self, other: &Buckets) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }

    /// Buckets in, of `family`.
    pub fn count(&self, family: u8) -> u32 {
        let half = (WORDS / 2) as usize;
        let words = if family == FAMILY_V4 {
            &self.0[..half]
        } else {
            &self.0[half..]
        };
        words.iter().map(|w| w.count_ones()).sum()
    }
}

/// The first `len` bits of an IPv4 address (or of an IPv6 address's first 32 bits).
fn mask(len: u32) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len.min(32))
    }
}

/// Where plan switches admit their buckets.
pub trait FilterCell {
    /// Clears the filter's bit of every bucket in `maybe`; sets none.
    fn admit(&mut self, maybe: &Buckets) -> Result<(), MapError>;
}

impl<F: FilterCell> FilterCell for &mut F {
    fn admit(&mut self, maybe: &Buckets) -> Result<(), MapError> {
        (**self).admit(maybe)
    }
}

/// In memory (tests): the buckets admitted so far.
impl FilterCell for Buckets {
    fn admit(&mut self, maybe: &Buckets) -> Result<(), MapError> {
        self.union(maybe);
        Ok(())
    }
}

/// `PASS_FILTER` as the kernel holds it, with a copy of its words (read at first use: an
/// adopted map holds what the previous agent wrote) so that only changed words are written.
pub struct PassFilter {
    map: Array<MapData, u64>,
    words: Option<Vec<u64>>,
}

impl PassFilter {
    pub fn new(map: Array<MapData, u64>) -> Self {
        PassFilter { map, words: None }
    }

    fn words(&mut self) -> Result<&mut Vec<u64>, MapError> {
        if self.words.is_none() {
            let words = (0..WORDS)
                .map(|i| self.map.get(&i, 0))
                .collect::<Result<Vec<_>, _>>()?;
            self.words = Some(words);
        }
        Ok(self.words.as_mut().expect("read above"))
    }

    /// Writes `want` (pass bits) word by word, only where it differs. Each word is one update,
    /// which a program reads whole or not at all.
    fn write(&mut self, want: impl Fn(usize, u64) -> u64) -> Result<u32, MapError> {
        let mut written = 0;
        for i in 0..WORDS as usize {
            let have = self.words()?[i];
            let new = want(i, have);
            if new != have {
                self.map.set(i as u32, new, 0)?;
                self.words()?[i] = new;
                written += 1;
            }
        }
        Ok(written)
    }

    /// Sets the filter to pass exactly the buckets not in `maybe`. Returns the words written.
    pub fn refine(&mut self, maybe: &Buckets) -> Result<u32, MapError> {
        self.write(|i, _| !maybe.0[i])
    }

    /// Passes nothing early (every word zero).
    pub fn clear(&mut self) -> Result<u32, MapError> {
        self.write(|_, _| 0)
    }

    /// Whether the programs pass a packet to `dst` of `family` at once (its bucket's bit).
    pub fn passes(&mut self, family: u8, dst: &[u8; 16]) -> Result<bool, MapError> {
        let (w, bit) = word_bit(bucket(family, dst));
        let word = match &self.words {
            Some(words) => words[w as usize],
            // One word, not the whole map (a one-off question, e.g. `explain --live`).
            None => self.map.get(&w, 0)?,
        };
        Ok(word >> bit & 1 != 0)
    }

    /// Buckets that pass, per family (IPv4, IPv6).
    pub fn passing(&mut self) -> Result<(u32, u32), MapError> {
        let w = self.words()?;
        let half = (WORDS / 2) as usize;
        let ones = |s: &[u64]| s.iter().map(|w| w.count_ones()).sum();
        Ok((ones(&w[..half]), ones(&w[half..])))
    }

    /// The map (for re-pinning).
    pub fn map(&self) -> &MapData {
        use aya::maps::IterableMap as _;
        self.map.map()
    }
}

impl FilterCell for PassFilter {
    fn admit(&mut self, maybe: &Buckets) -> Result<(), MapError> {
        self.write(|i, have| have & !maybe.0[i]).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut d = [0; 16];
        d[..4].copy_from_slice(&a);
        d
    }

    fn has(b: &Buckets, family: u8, dst: [u8; 16]) -> bool {
        b.contains(bucket(family, &dst))
    }

    #[test]
    fn prefixes_cover_every_address_they_hold_and_little_else() {
        type V4 = [u8; 4];
        // (prefix, length, inside, outside)
        let cases: &[(V4, u32, V4, V4)] = &[
            ([203, 0, 113, 0], 24, [203, 0, 113, 255], [203, 0, 129, 0]),
            ([198, 51, 100, 7], 32, [198, 51, 100, 7], [198, 51, 112, 0]),
            ([10, 0, 0, 0], 8, [10, 255, 255, 255], [11, 0, 0, 0]),
            ([172, 16, 0, 0], 12, [172, 31, 255, 255], [172, 32, 0, 0]),
            ([192, 0, 2, 0], 19, [192, 0, 31, 255], [192, 0, 32, 0]),
            // Host bits beyond the prefix are ignored, as the trie ignores them.
            ([100, 64, 9, 9], 16, [100, 64, 255, 255], [100, 65, 0, 0]),
        ];
        for (prefix, len, inside, outside) in cases {
            let mut b = Buckets::default();
            b.add_v4_prefix(*prefix, *len);
            assert!(
                has(&b, FAMILY_V4, v4(*inside)),
                "{prefix:?}/{len}: {inside:?}"
            );
            assert!(
                has(&b, FAMILY_V4, v4(*prefix)),
                "{prefix:?}/{len}: its own address"
            );
            assert!(
                !has(&b, FAMILY_V4, v4(*outside)),
                "{prefix:?}/{len}: {outside:?}"
            );
            let want = 1u32 << BUCKET_BITS.saturating_sub(*len);
            assert_eq!(b.count(FAMILY_V4), want, "{prefix:?}/{len}");
            assert_eq!(b.count(FAMILY_V6), 0);
        }
        let mut all = Buckets::default();
        all.add_v4_prefix([0; 4], 0);
        assert_eq!(all.count(FAMILY_V4), BUCKETS);
        assert_eq!(all.count(FAMILY_V6), 0);
    }

    #[test]
    fn ipv6_prefixes_cover_every_slash_32_they_hold() {
        let db8: [u8; 16] = "2001:db8::".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let mut b = Buckets::default();
        b.add_v6_prefix(db8, 48);
        assert!(has(&b, FAMILY_V6, db8));
        let far: [u8; 16] = "2001:db8:ffff:ffff::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        assert!(has(&b, FAMILY_V6, far), "same /32, same bucket");
        assert_eq!(b.count(FAMILY_V6), 1);
        assert_eq!(b.count(FAMILY_V4), 0);
        // A /24 covers 256 /32s: each one's bucket is in.
        let mut wide = Buckets::default();
        wide.add_v6_prefix(db8, 24);
        for i in 0..=255u8 {
            let mut a = db8;
            a[3] = i;
            assert!(has(&wide, FAMILY_V6, a), "2001:0d{i:02x}::");
        }
        assert!(wide.count(FAMILY_V6) <= 256);
        // Wider than there are buckets: all of them.
        let mut huge = Buckets::default();
        huge.add_v6_prefix([0x20; 16], 3);
        assert_eq!(huge.count(FAMILY_V6), BUCKETS);
    }

    #[test]
    fn the_plan_admits_its_policies_peer_policies_pool_and_shared_addresses() {
        let config = crate::config::Config::embedded();
        let topology = crate::validate::validate(&config).unwrap();
        for server in config.servers.iter().map(|s| s.name.as_str()) {
            let plan = crate::plan::plan(&topology, server);
            let contents = crate::plan::map_contents(&topology, &plan);
            let b = Buckets::of_plan(&contents);
            for (len, k) in contents.policies_v4.keys() {
                assert!(has(&b, FAMILY_V4, v4(k.addr)), "{server}: policy /{len}");
            }
            for (_, k) in contents.policies_v6.keys() {
                assert!(has(&b, FAMILY_V6, k.addr), "{server}: IPv6 policy");
            }
            for (k, a) in &contents.actions {
                for t in a.snat.iter().take(usize::from(a.snat_count)) {
                    assert!(has(&b, k.family, t.addr), "{server}: pool address");
                }
            }
            // A server holding no share of an address still sends a packet for it on.
            for k in contents.owners.keys() {
                assert!(has(&b, FAMILY_V4, v4(k.addr)), "{server}: shared address");
            }
            // The lab's documentation ranges are a few buckets, not the internet.
            assert!(b.count(FAMILY_V4) < 64, "{server}: {b:?}");
        }
    }

    #[test]
    fn admitting_only_clears_pass_bits() {
        let mut admitted = Buckets::default();
        let mut a = Buckets::default();
        a.add_v4_prefix([203, 0, 113, 0], 24);
        let mut b = Buckets::default();
        b.add_v4_prefix([198, 51, 100, 0], 24);
        admitted.admit(&a).unwrap();
        admitted.admit(&b).unwrap();
        assert!(has(&admitted, FAMILY_V4, v4([203, 0, 113, 1])), "kept");
        assert!(has(&admitted, FAMILY_V4, v4([198, 51, 100, 1])));
        assert_eq!(admitted.count(FAMILY_V4), 2);
    }
}
