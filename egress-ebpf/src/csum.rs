//! Ones-complement checksum arithmetic for fields the programs change themselves (RFC 1624).
//!
//! Used where no offload state is involved: the IPv4 header, and ICMP errors (received packets,
//! never CHECKSUM_PARTIAL) whose quoted headers change; and to sum an IPv6 address change that
//! the kernel's helper then applies to the transport checksum. Words are taken as they lie in memory:
//! ones-complement sums do not depend on byte order as long as all words are read alike.

/// The change of a set of 16-bit words: the sum of `!old + new` over each changed word.
#[derive(Clone, Copy, Default)]
pub struct Delta(u32);

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

impl Delta {
    /// Records that the word `old` became `new`.
    #[inline(always)]
    pub fn word(&mut self, old: u16, new: u16) {
        self.0 = u32::from(fold(self.0 + u32::from(!old) + u32::from(new)));
    }

    /// Records a 4-byte field change.
    #[inline(always)]
    pub fn bytes4(&mut self, old: &[u8; 4], new: &[u8; 4]) {
        self.word(
            u16::from_ne_bytes([old[0], old[1]]),
            u16::from_ne_bytes([new[0], new[1]]),
        );
        self.word(
            u16::from_ne_bytes([old[2], old[3]]),
            u16::from_ne_bytes([new[2], new[3]]),
        );
    }

    /// Records a 16-byte field change (an IPv6 address).
    #[inline(always)]
    pub fn bytes16(&mut self, old: &[u8; 16], new: &[u8; 16]) {
        let mut i = 0;
        while i < 16 {
            self.word(
                u16::from_ne_bytes([old[i], old[i + 1]]),
                u16::from_ne_bytes([new[i], new[i + 1]]),
            );
            i += 2;
        }
    }

    /// Records the change of an address of `family` (IPv4 in the first 4 bytes).
    #[inline(always)]
    pub fn addr(&mut self, v4: bool, old: &[u8; 16], new: &[u8; 16]) {
        if v4 {
            self.bytes4(
                &[old[0], old[1], old[2], old[3]],
                &[new[0], new[1], new[2], new[3]],
            );
        } else {
            self.bytes16(old, new);
        }
    }

    /// The recorded change as a ones-complement sum (16 bits, folded): what the kernel's
    /// checksum helpers take as a difference.
    #[inline(always)]
    pub fn sum(self) -> u32 {
        self.0
    }

    /// The checksum `check` (as stored) updated for every recorded change.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        !fold(u32::from(!check) + self.0)
    }
}

/// `check` updated for a 32-bit field that changed from `from` to `to` (both as stored).
#[inline(always)]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let mut d = Delta::default();
    d.bytes4(&from.to_ne_bytes(), &to.to_ne_bytes());
    d.apply(check)
}
