//! Types shared by the BPF programs and the agent: map names, keys, values and counter indexes.
//!
//! Everything here is `#[repr(C)]` with explicit padding so the kernel and userspace agree on
//! layout; each type carries a compile-time size check.
#![no_std]

pub mod action;
pub mod clock;
pub mod fabric;
pub mod filter;
pub mod flow;
pub mod policy;

/// Plan generations: every key of the plan maps (`POLICY_V4`, `POLICY_V6`, `PEER_POLICY`,
/// `ACTIONS`, `PEERS`, `OWNERS`) carries a generation, 0 or 1, and `GENERATION[0]` says which
/// one is in force. The agent writes a new plan into the other generation, switches with that
/// one update, then removes the old one: a program reads the generation once and sees one
/// whole plan, never a mix. Each plan map therefore holds up to two plans at once.
pub mod generation {
    /// The generation after `g`.
    pub const fn next(g: u8) -> u8 {
        (g & 1) ^ 1
    }
}
pub mod stats;
pub mod wire;

/// Names of the pinned maps. The agent pins each one at `<pin dir>/<name>`; bpftool shows them
/// under the same names.
pub mod map_names {
    pub const STATS: &str = "STATS";
    pub const POLICY_V4: &str = "POLICY_V4";
    pub const POLICY_V6: &str = "POLICY_V6";
    pub const ACTIONS: &str = "ACTIONS";
    pub const FLOWS: &str = "FLOWS";
    /// Per-CPU cache of FIB results (never pinned: rebuilt by the programs).
    pub const ROUTES: &str = "ROUTES";
    /// Per-CPU clock of the current tick ([`crate::clock`]; never pinned: rebuilt by the
    /// programs).
    pub const CLOCK: &str = "CLOCK";
    /// Per-CPU scratch of a new connection's claim (never pinned: nothing in it outlives a
    /// program run).
    pub const CLAIM: &str = "CLAIM";
    /// The benchmark's reference new-connection program's table (not one of [`ALL`]: never
    /// pinned, one entry unless the benchmark sizes it).
    pub const REF_FLOWS: &str = "REF_FLOWS";
    /// `--trace`'s one-slot program table (never pinned: filled on each load that traces).
    pub const TRACE_PROG: &str = "TRACE_PROG";
    pub const LOCAL: &str = "LOCAL";
    pub const PEERS: &str = "PEERS";
    pub const OWNERS: &str = "OWNERS";
    pub const PEER_POLICY: &str = "PEER_POLICY";
    /// The ingress programs' tail-call table. Pinned like the rest: the kernel empties a program
    /// array when its last user reference goes, which would cut the tunnel and ICMP paths while
    /// no agent runs.
    pub const JUMP: &str = "JUMP";
    pub const FRAGS: &str = "FRAGS";
    /// Connections translated here per peer (the peer budget), recounted by the agent.
    pub const PEER_LOAD: &str = "PEER_LOAD";
    /// The plan generation in force (one entry; see [`crate::generation`]).
    pub const GENERATION: &str = "GENERATION";
    /// Destination buckets that can have no policy and no flow entry ([`crate::filter`]).
    pub const PASS_FILTER: &str = "PASS_FILTER";

    /// Every map the programs declare, for pinning and adoption.
    pub const ALL: [&str; 14] = [
        STATS,
        POLICY_V4,
        POLICY_V6,
        ACTIONS,
        FLOWS,
        LOCAL,
        PEERS,
        OWNERS,
        PEER_POLICY,
        JUMP,
        FRAGS,
        PEER_LOAD,
        GENERATION,
        PASS_FILTER,
    ];
}

/// Names of the programs in the object file (kernel limit: 15 characters).
pub mod prog_names {
    pub const TC_EGRESS: &str = "tc_egress";
    pub const TC_INGRESS: &str = "tc_ingress";
    /// Returns TC_ACT_OK and nothing else: the benchmarks' baseline.
    pub const TC_EMPTY: &str = "tc_empty";
    /// Tail-called by `tc_ingress` for IPv4 GRE.
    pub const TC_TUNNEL: &str = "tc_tunnel";
    /// The benchmark's reference programs (never attached): the least work of each path.
    pub const REF_PASS: &str = "ref_pass";
    pub const REF_REWRITE: &str = "ref_rewrite";
    pub const REF_CLAIM: &str = "ref_claim";
    pub const REF_LOOKUP: &str = "ref_lookup";
    pub const REF_ENCAP: &str = "ref_encap";
    pub const REF_RW_ENCAP: &str = "ref_rw_encap";
    pub const REF_DECAP: &str = "ref_decap";
    /// Tail-called by `tc_ingress` and `tc_tunnel` for ICMP errors.
    pub const TC_ICMP_ERROR: &str = "tc_icmp_error";
    /// Tail-called by `tc_egress` for later fragments.
    pub const TC_FRAG_OUT: &str = "tc_frag_out";
    /// Tail-called by `tc_ingress` and `tc_tunnel` for later fragments.
    pub const TC_FRAG_IN: &str = "tc_frag_in";
    /// Tail-called by `tc_egress` for new connections.
    pub const TC_NEW_OUT: &str = "tc_new_out";

    /// The global of the programs that says one decision in how many is logged (aya-log);
    /// 0, the default: none, and the logging step is dead code to the verifier.
    pub const TRACE_EVERY: &str = "TRACE_EVERY";
    /// The global of the programs that keys the sent hint's tag (`fabric::sent_tag`): random,
    /// written by the loader, one per load.
    pub const SENT_KEY: &str = "SENT_KEY";
    /// Tail-called (through its own one-slot table, `TRACE_PROG`) for a sampled decision.
    pub const TC_TRACE: &str = "tc_trace";
    /// `egress agent --xdp`: the receive paths that need no socket and no new state, on the
    /// uplink before an skb exists; what it leaves goes on to `tc_ingress`.
    pub const XDP_INGRESS: &str = "xdp_ingress";
    /// Returns XDP_PASS and nothing else: the XDP rows' baseline in the benchmarks.
    pub const XDP_EMPTY: &str = "xdp_empty";

    /// Slots of the `JUMP` map.
    pub const JUMP_TUNNEL: u32 = 0;
    pub const JUMP_ICMP_ERROR: u32 = 1;
    pub const JUMP_FRAG_OUT: u32 = 2;
    pub const JUMP_FRAG_IN: u32 = 3;
    pub const JUMP_NEW_OUT: u32 = 4;
    pub const JUMP_SLOTS: u32 = 5;
    /// Every tail-called program, by slot.
    pub const JUMP_TARGETS: [(u32, &str); 5] = [
        (JUMP_TUNNEL, TC_TUNNEL),
        (JUMP_ICMP_ERROR, TC_ICMP_ERROR),
        (JUMP_FRAG_OUT, TC_FRAG_OUT),
        (JUMP_FRAG_IN, TC_FRAG_IN),
        (JUMP_NEW_OUT, TC_NEW_OUT),
    ];
}
