//! Policy lookup: `(mark, destination)` → pool, then `(pool, family)` → planned action.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    macros::btf_map,
};
use egress_common::{
    action::{ACTIONS_CAPACITY, Action, ActionKey, FAMILY_V4},
    filter,
    policy::{
        POLICY_CAPACITY, POOL_BITS, PeerPolicyKey, PolicyKeyV4, PolicyKeyV6, PolicyValue,
        pool_for_mark, prefix_len,
    },
};

use crate::parse::Ip;

#[btf_map]
static POLICY_V4: LpmTrie<PolicyKeyV4, PolicyValue, { POLICY_CAPACITY as usize }> = LpmTrie::new();
#[btf_map]
static POLICY_V6: LpmTrie<PolicyKeyV6, PolicyValue, { POLICY_CAPACITY as usize }> = LpmTrie::new();
#[btf_map]
static PEER_POLICY: LpmTrie<PeerPolicyKey, PolicyValue, { POLICY_CAPACITY as usize }> =
    LpmTrie::new();
#[btf_map]
// Not preallocated: sized for a large fleet's pools, it costs only what the plan holds.
static ACTIONS: HashMap<
    ActionKey,
    Action,
    { ACTIONS_CAPACITY as usize },
    { aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

#[btf_map]
static GENERATION: Array<u32, 1> = Array::new();

#[btf_map]
static PASS_FILTER: Array<u64, { filter::WORDS as usize }> = Array::new();

/// Whether the pass filter (`egress_common::filter`) says that no policy, pool address or flow
/// entry has a destination in `ip`'s bucket: then neither the flow table nor the policy
/// (leaving) nor the owners (arriving) can match, and the lookups are skipped. One array read
/// (the verifier inlines it).
#[inline(always)]
pub fn filtered_out(ip: &Ip) -> bool {
    let (word, bit) = filter::word_bit(filter::bucket(ip.family, &ip.dst));
    PASS_FILTER.get(word).is_some_and(|w| (*w >> bit) & 1 != 0)
}

/// The plan generation in force. A program reads it once and passes it to every plan lookup
/// it makes, so that one decision never mixes two plans (see `egress_common::generation`).
#[inline(always)]
pub fn generation() -> u8 {
    GENERATION.get(0).map_or(0, |g| (*g & 1) as u8)
}

/// The pool whose policy covers the packet's destination ([`pool_for_mark`]: the packet's mark
/// first, then mark 0).
#[inline(always)]
pub fn pool_for(ip: &Ip, mark: u32, g: u8) -> Option<u32> {
    if !egress_common::policy::coverable(ip.family, &ip.dst) {
        return None;
    }
    pool_for_mark(mark, |m| lookup(ip, m, g))
}

#[inline(always)]
fn lookup(ip: &Ip, mark: u32, g: u8) -> Option<u32> {
    let hit = if ip.family == FAMILY_V4 {
        let mut addr = [0u8; 4];
        addr.copy_from_slice(&ip.dst[..4]);
        POLICY_V4.get(&Key::new(prefix_len(32), PolicyKeyV4::new(g, mark, addr)))
    } else {
        POLICY_V6.get(&Key::new(
            prefix_len(128),
            PolicyKeyV6::new(g, mark, ip.dst),
        ))
    };
    hit.map(|v| v.pool)
}

/// The planned action for new connections of `pool` in `family`.
#[inline(always)]
pub fn action_for(pool: u32, family: u8, g: u8) -> Option<&'static Action> {
    // SAFETY: the value lives in the map for the program's run; we only read it.
    unsafe { ACTIONS.get(ActionKey::in_gen(pool, family, g)) }
}

/// Whether some policy of `pool`, with any mark, covers IPv4 destination `dst`: a peer may only
/// have its connections translated here towards those.
#[inline(always)]
pub fn peer_allowed(pool: u32, dst: &[u8; 16], g: u8) -> bool {
    if !egress_common::policy::coverable(FAMILY_V4, dst) {
        return false;
    }
    let key = Key::new(
        POOL_BITS + 32,
        PeerPolicyKey {
            gen_be: u32::from(g).to_be(),
            pool_be: pool.to_be(),
            addr: [dst[0], dst[1], dst[2], dst[3]],
        },
    );
    PEER_POLICY.get(&key).is_some()
}
