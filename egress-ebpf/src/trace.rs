//! `egress agent --trace`: a sampled log line per decision (counter, verdict, the packet's
//! addresses as it leaves) through aya-log. The sampling rate is a global the loader writes
//! before the verifier sees the programs: 0 (the default) makes the step dead code that the
//! verifier removes, so tracing off costs nothing. On, a sampled decision is handed to
//! `tc_trace` by a tail call: the logging runs in a frame of its own (the programs' frames
//! leave no room for aya-log's on their stack).

use aya_ebpf::{
    Global,
    btf_maps::ProgramArray,
    helpers::bpf_get_prandom_u32,
    macros::{btf_map, classifier},
    programs::TcContext,
};
use aya_log_ebpf::info;
use egress_common::{stats::Stat, wire};

/// One decision in this many is logged; 0: none. Written by the loader
/// (`egress_common::prog_names::TRACE_EVERY`).
#[unsafe(no_mangle)]
static TRACE_EVERY: Global<u32> = Global::new(0);

/// `tc_trace`, filled by the loader when tracing (not pinned: one per load).
#[btf_map]
static TRACE_PROG: ProgramArray<1> = ProgramArray::new();

/// Off, this is one load of a constant the verifier knows and a branch it removes. On and
/// sampled, it does not return: `tc_trace` logs and returns `code`.
#[inline(always)]
pub fn decision(ctx: &TcContext, stat: Stat, code: i32) {
    let every = TRACE_EVERY.load();
    if every == 0 {
        return;
    }
    // SAFETY: a helper without arguments.
    if unsafe { bpf_get_prandom_u32() } % every != 0 {
        return;
    }
    // The decision travels with the packet (the skb's control block, which TC programs own
    // while they run), not through memory another packet could write in between.
    let skb = ctx.skb.skb;
    // SAFETY: the verifier-checked context of this program; cb[0..2] are writable from TC.
    unsafe {
        (*skb).cb[0] = stat as u32;
        (*skb).cb[1] = code as u32;
    }
    // SAFETY: a tail call; on failure (no program) the caller returns `code` itself.
    unsafe { TRACE_PROG.tail_call(ctx, 0) };
}

/// Logs the decision `decision` handed over, and returns its code.
#[classifier]
pub fn tc_trace(ctx: TcContext) -> i32 {
    // Written by `decision` just before the tail call, for this packet.
    let (stat, code) = (ctx.cb()[0], ctx.cb()[1]);
    // Numbers, named in userspace (`egress::loader::trace_line`): a name per counter would be
    // a path per counter for the verifier.
    match ctx.load::<u16>(12).map(u16::from_be) {
        Ok(wire::ETH_P_IP) => {
            if let (Ok(src), Ok(dst), Ok(proto)) = (
                ctx.load::<[u8; 4]>(26),
                ctx.load::<[u8; 4]>(30),
                ctx.load::<u8>(23),
            ) {
                info!(
                    &ctx,
                    "{} {}: proto {} {:i} -> {:i}", stat, code, proto, src, dst
                );
            }
        }
        Ok(wire::ETH_P_IPV6) => {
            if let (Ok(src), Ok(dst), Ok(proto)) = (
                ctx.load::<[u8; 16]>(22),
                ctx.load::<[u8; 16]>(38),
                ctx.load::<u8>(20),
            ) {
                info!(
                    &ctx,
                    "{} {}: proto {} {:i} -> {:i}", stat, code, proto, src, dst
                );
            }
        }
        _ => info!(&ctx, "{} {}: not IP", stat, code),
    }
    code as i32
}
