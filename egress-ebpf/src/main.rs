//! The TC programs attached to a server's uplink. This file only declares the programs; the
//! work lives in modules by concern.
#![no_std]
#![no_main]

mod stats;

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use egress_common::stats::Stat;

/// Locally originated packets leaving through the uplink.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    stats::count(Stat::EgressSeen, ctx.len());
    TC_ACT_OK
}

/// Packets arriving on the uplink.
#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    stats::count(Stat::IngressSeen, ctx.len());
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
