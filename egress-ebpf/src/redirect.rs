//! Sending a packet out of the uplink towards an IPv4 next hop with correct L2 addresses.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_OUTPUT, TC_ACT_OK, bpf_fib_lookup, bpf_redir_neigh,
    },
    btf_maps::PerCpuArray,
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_redirect_neigh,
    },
    macros::btf_map,
    programs::TcContext,
};
use egress_common::{
    fabric::{ROUTE_SLOTS, ROUTE_TTL_NS, RouteSlot},
    stats::Stat,
};

/// A FIB lookup costs more than all the rest of a forwarded packet's work (measured: about
/// 170 ns of 500): its result is kept per CPU for [`ROUTE_TTL_NS`], by next hop.
#[btf_map]
static ROUTES: PerCpuArray<RouteSlot, { ROUTE_SLOTS as usize }> = PerCpuArray::new();

/// The slot of next hop `dst` (Fibonacci hashing of the address).
#[inline(always)]
fn slot(dst: [u8; 4]) -> u32 {
    u32::from_ne_bytes(dst).wrapping_mul(0x9e37_79b1) >> (32 - ROUTE_SLOTS.trailing_zeros())
}

/// Writes the MACs and picks the verdict for a packet leaving through `out`.
#[inline(always)]
fn send(ctx: &TcContext, macs: &[u8; 12], out: u32, ifindex: u32, from: From) -> Result<i32, Stat> {
    ctx.store(0, macs, 0).map_err(|_| Stat::NoRoute)?;
    Ok(match from {
        From::Egress if out == ifindex => TC_ACT_OK,
        // SAFETY: plain helper call.
        _ => unsafe { bpf_redirect(out, 0) as i32 },
    })
}

const AF_INET: u8 = 2;

/// Where the program runs: on egress the packet already leaves through the uplink, on ingress
/// it has to be redirected out of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum From {
    Egress,
    Ingress,
}

/// Routes the packet to IPv4 `dst` out of `ifindex`: FIB lookup for the next hop and MACs (a
/// successful one cached per CPU for a second); when the neighbour is not resolved yet, the
/// kernel resolves it (bpf_redirect_neigh, not cached). The
/// egress program recognises what it sends by its addresses, not by a mark. Returns the TC
/// verdict.
#[inline(always)]
pub fn to(ctx: &TcContext, dst: [u8; 4], ifindex: u32, from: From) -> Result<i32, Stat> {
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let cached = ROUTES.get_ptr_mut(slot(dst));
    if let Some(c) = cached {
        // SAFETY: this CPU's slot, valid for the program's run.
        let c = unsafe { &*c };
        if c.dst == dst && c.ifindex_in == ifindex && now.wrapping_sub(c.at_ns) < ROUTE_TTL_NS {
            return send(ctx, &c.macs, c.ifindex_out, ifindex, from);
        }
    }
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
        if let Some(c) = cached {
            // SAFETY: this CPU's slot, valid for the program's run; no other CPU writes it.
            unsafe {
                *c = RouteSlot {
                    dst,
                    ifindex_in: ifindex,
                    ifindex_out: p.ifindex,
                    macs,
                    at_ns: now,
                }
            };
        }
        return send(ctx, &macs, p.ifindex, ifindex, from);
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
