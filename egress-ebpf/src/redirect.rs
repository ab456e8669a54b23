//! Sending a packet out of the uplink towards an IPv4 next hop with correct L2 addresses.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_OUTPUT, TC_ACT_OK, bpf_fib_lookup, bpf_redir_neigh, xdp_action,
    },
    btf_maps::PerCpuArray,
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    macros::btf_map,
    programs::{TcContext, XdpContext},
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

/// A next hop out of an interface, with the Ethernet addresses to write.
#[derive(Clone, Copy)]
pub struct Route {
    pub macs: [u8; 12],
    pub out: u32,
}

/// What the FIB says about a destination.
enum Found {
    Route(Route),
    /// Route known, neighbour `nh` (IPv4, as stored) out of `out` not resolved yet.
    Unresolved {
        out: u32,
        nh: u32,
    },
    /// The helper refuses lookups on a device without IP forwarding.
    ForwardingOff,
    None,
}

/// The route to IPv4 `dst` out of `ifindex`: from this CPU's cache, else a FIB lookup (a
/// successful one cached for a second). `ctx`: the program's context (skb or XDP buffer).
#[inline(always)]
fn find(ctx: *mut core::ffi::c_void, dst: [u8; 4], ifindex: u32) -> Found {
    let now = crate::clock::now();
    let cached = ROUTES.get_ptr_mut(slot(dst));
    if let Some(c) = cached {
        // SAFETY: this CPU's slot, valid for the program's run.
        let c = unsafe { &*c };
        if c.dst == dst
            && c.ifindex_in == ifindex
            && c.ifindex_out != PENDING
            && now.wrapping_sub(c.at_ns) < ROUTE_TTL_NS
        {
            return Found::Route(Route {
                macs: c.macs,
                out: c.ifindex_out,
            });
        }
    }
    // SAFETY: a zeroed bpf_fib_lookup is a valid (empty) request.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.ifindex = ifindex;
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: p is a valid bpf_fib_lookup of the size passed; ctx is the program's context.
    let rc = unsafe {
        fib_lookup(
            ctx,
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
        return Found::Route(Route {
            macs,
            out: p.ifindex,
        });
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        return Found::Unresolved {
            out: p.ifindex,
            // SAFETY: union field of a plain struct.
            nh: unsafe { p.__bindgen_anon_4.ipv4_dst },
        };
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_FWD_DISABLED) {
        return Found::ForwardingOff;
    }
    Found::None
}

/// Routes the packet to IPv4 `dst` out of `ifindex`: FIB lookup for the next hop and MACs (a
/// successful one cached per CPU for a second); when the neighbour is not resolved yet, the
/// kernel resolves it (bpf_redirect_neigh, not cached). The
/// egress program recognises what it sends by its addresses, not by a mark. Returns the TC
/// verdict.
#[inline(always)]
pub fn to(ctx: &TcContext, dst: [u8; 4], ifindex: u32, from: From) -> Result<i32, Stat> {
    match find(ctx.skb.skb as *mut _, dst, ifindex) {
        Found::Route(r) => send(ctx, &r.macs, r.out, ifindex, from),
        Found::Unresolved { out, nh } => {
            // The kernel resolves the neighbour.
            // SAFETY: zeroed then filled; the helper reads `size_of` bytes.
            let mut n: bpf_redir_neigh = unsafe { core::mem::zeroed() };
            n.nh_family = u32::from(AF_INET);
            n.__bindgen_anon_1.ipv4_nh = nh;
            // SAFETY: n is valid for the size passed.
            let r = unsafe {
                bpf_redirect_neigh(
                    out,
                    &mut n,
                    core::mem::size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            };
            Ok(r as i32)
        }
        Found::ForwardingOff => {
            // The kernel's own route and neighbour lookup (no next hop given) has no such
            // condition; what it writes is learnt as the packet leaves (see `learn`).
            await_kernel_route(dst, ifindex);
            // SAFETY: a null next hop with length 0 is the documented "look it up" form.
            let r = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
            Ok(r as i32)
        }
        Found::None => Err(Stat::NoRoute),
    }
}

/// `ifindex_out` of a slot waiting for the kernel to address a packet to its destination.
const PENDING: u32 = 0;
/// How long a pending slot waits: the redirect runs right after the program, on the same CPU;
/// a packet the kernel dropped instead leaves nothing waiting for a later frame to fill.
const PENDING_NS: u64 = 10_000_000;

/// Marks `dst`'s slot on this CPU as waiting for what the kernel writes on the packet just
/// handed to `bpf_redirect_neigh` (the FIB helper refused: an uplink without IP forwarding,
/// as a server's usually is), for [`PENDING_NS`]. A pending slot is no route.
#[inline(always)]
fn await_kernel_route(dst: [u8; 4], ifindex: u32) {
    let now = crate::clock::now();
    if let Some(c) = ROUTES.get_ptr_mut(slot(dst)) {
        // SAFETY: this CPU's slot, valid for the program's run; no other CPU writes it.
        unsafe {
            *c = RouteSlot {
                dst,
                ifindex_in: ifindex,
                ifindex_out: PENDING,
                macs: [0; 12],
                at_ns: now,
            }
        };
    }
}

/// Learns the route to IPv4 `dst` from a packet leaving through the uplink (`ifindex`) with the
/// MACs the kernel's neighbour output wrote — only when this CPU has just handed a packet to
/// `dst` to `bpf_redirect_neigh` (its slot is pending: the redirect runs on the same CPU right
/// after the program). A packet sent with cached MACs never refreshes them (a changed neighbour
/// still takes effect within a second), and a frame no redirect of ours preceded (a local raw
/// sender's) teaches nothing. The next packets to `dst` (TC or XDP) find their next hop cached.
#[inline(always)]
pub fn learn(ctx: &TcContext, dst: [u8; 4], ifindex: u32) {
    let Some(c) = ROUTES.get_ptr_mut(slot(dst)) else {
        return;
    };
    // SAFETY: this CPU's slot, valid for the program's run; no other CPU writes it.
    let c = unsafe { &mut *c };
    // Almost every packet here finds its route cached: decided before the clock is read.
    if c.dst != dst || c.ifindex_in != ifindex || c.ifindex_out != PENDING {
        return;
    }
    let now = crate::clock::now();
    if now.wrapping_sub(c.at_ns) >= PENDING_NS {
        return;
    }
    let Ok(macs) = crate::parse::read::<[u8; 12]>(ctx, 0) else {
        return;
    };
    // tc_egress runs on the uplink only: the packet leaves through it.
    *c = RouteSlot {
        dst,
        ifindex_in: ifindex,
        ifindex_out: ifindex,
        macs,
        at_ns: now,
    };
}

/// The resolved route to IPv4 `dst` out of `ifindex` for an XDP program, which has no way to
/// have a neighbour resolved: None leaves the packet to the TC programs.
#[inline(always)]
pub fn resolved(ctx: &XdpContext, dst: [u8; 4], ifindex: u32) -> Option<Route> {
    match find(ctx.ctx as *mut _, dst, ifindex) {
        // Only back out of the uplink (XDP_TX): a redirect to another device (a VLAN device,
        // a bond, a NIC without XDP transmit rings) may be dropped silently.
        Found::Route(r) if r.out == ifindex => Some(r),
        _ => None,
    }
}

/// Writes the MACs of `r` (a route out of the uplink, see [`resolved`]) and returns XDP_TX.
#[inline(always)]
pub fn send_xdp(ctx: &XdpContext, r: &Route) -> Result<u32, Stat> {
    crate::parse::write(ctx, 0, &r.macs).map_err(|()| Stat::NoRoute)?;
    Ok(xdp_action::XDP_TX)
}
