//! `egress agent --trace`: a sampled log line per decision (counter, verdict, the packet's
//! addresses as it leaves) through aya-log. The sampling rate is a global the loader writes
//! before the verifier sees the programs: 0 (the default) makes the step dead code that the
//! verifier removes, so tracing off costs nothing. On, a sampled decision is handed to
//! `tc_trace` by a tail call: the logging runs in a frame of its own (the programs' frames
//! leave no room for aya-log's on their stack).

use aya_ebpf::{
    Global,
    btf_maps::{PerCpuArray, ProgramArray},
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

/// The decision being handed to `tc_trace`: counter, TC return code.
#[btf_map]
static TRACE_DECISION: PerCpuArray<[u32; 2], 1> = PerCpuArray::new();

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
    if let Some(d) = TRACE_DECISION.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array, read back by the program tail-called
        // next on the same CPU.
        unsafe { *d = [stat as u32, code as u32] };
        // SAFETY: a tail call; on failure (no program) the caller returns `code` itself.
        unsafe { TRACE_PROG.tail_call(ctx, 0) };
    }
}

/// Logs the decision `decision` handed over, and returns its code.
#[classifier]
pub fn tc_trace(ctx: TcContext) -> i32 {
    // SAFETY: this CPU's slot, written just before the tail call.
    let Some(&[stat, code]) = TRACE_DECISION.get_ptr(0).map(|d| unsafe { &*d }) else {
        return aya_ebpf::bindings::TC_ACT_OK;
    };
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
