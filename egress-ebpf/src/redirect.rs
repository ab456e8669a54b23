//! Sending a packet out of the uplink towards an IPv4 next hop with correct L2 addresses.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_OUTPUT, TC_ACT_OK, bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use egress_common::stats::Stat;

const AF_INET: u8 = 2;

/// Where the program runs: on egress the packet already leaves through the uplink, on ingress
/// it has to be redirected out of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum From {
    Egress,
    Ingress,
}

/// Routes the packet to IPv4 `dst` out of `ifindex`: FIB lookup for the next hop and MACs;
/// when the neighbour is not resolved yet, the kernel resolves it (bpf_redirect_neigh). The
/// egress program recognises what it sends by its addresses, not by a mark. Returns the TC
/// verdict.
#[inline(always)]
pub fn to(ctx: &TcContext, dst: [u8; 4], ifindex: u32, from: From) -> Result<i32, Stat> {
    // SAFETY: a zeroed bpf_fib_lookup is a valid (empty) request.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.ifindex = ifindex;
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: p is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&p.dmac);
        macs[6..].copy_from_slice(&p.smac);
        ctx.store(0, &macs, 0).map_err(|_| Stat::NoRoute)?;
        return Ok(match from {
            From::Egress if p.ifindex == ifindex => TC_ACT_OK,
            // SAFETY: plain helper call.
            _ => unsafe { bpf_redirect(p.ifindex, 0) as i32 },
        });
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        // Route known, neighbour not resolved yet: the kernel resolves it.
        // SAFETY: zeroed then filled; the helper reads `size_of` bytes.
        let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
        nh.nh_family = u32::from(AF_INET);
        // SAFETY: union field of a plain struct.
        nh.__bindgen_anon_1.ipv4_nh = unsafe { p.__bindgen_anon_4.ipv4_dst };
        // SAFETY: nh is valid for the size passed.
        let r = unsafe {
            bpf_redirect_neigh(
                p.ifindex,
                &mut nh,
                core::mem::size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        };
        return Ok(r as i32);
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_FWD_DISABLED) {
        // The helper refuses lookups on devices without IP forwarding; the kernel's own
        // route and neighbour lookup (no next hop given) has no such condition.
        // SAFETY: a null next hop with length 0 is the documented "look it up" form.
        let r = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
        return Ok(r as i32);
    }
    Err(Stat::NoRoute)
}
