//! `egress flows`: the live connections in a server's flow table.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::ExitCode,
};

use aya::maps::{HashMap, Map};
use egress_common::{
    flow::{FLOW_FORWARDED, FLOW_OUTBOUND, FlowKey, FlowValue},
    map_names,
};
use serde::Serialize;

use super::{ConfigArg, Format};
use crate::flows::{State, monotonic_ns};

/// List live connections: original and translated tuples, how they leave, idle time.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArg,
    #[command(flatten)]
    pins: super::PinArgs,
    /// Only connections of this pool.
    #[arg(long)]
    pool: Option<String>,
    /// Only connections to this destination.
    #[arg(long)]
    dst: Option<IpAddr>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(Debug, Serialize)]
struct Row {
    proto: &'static str,
    pool: String,
    original: String,
    translated: Option<String>,
    /// local (translated here), peer (translated here for another server's socket), or
    /// forwarded (sent to a peer).
    path: &'static str,
    /// Forwarded: the peer; peer: the socket's server.
    via: Option<String>,
    /// unreplied, open, closing (the socket's FIN) or reset (a RST was the latest packet).
    state: &'static str,
    idle_s: u64,
}

fn addr(family: u8, a: &[u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*a))
    }
}

fn endpoint(ip: IpAddr, port_be: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{}", u16::from_be(port_be)),
        IpAddr::V6(a) => format!("[{a}]:{}", u16::from_be(port_be)),
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = args.config.load()?;
    let dir = args.pins.dir(&args.config)?;
    let data = super::open_pinned(&dir, map_names::FLOWS)?;
    let flows: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(Map::HashMap(data))?;
    let pools: BTreeMap<u32, String> = config
        .pools
        .iter()
        .map(|p| (p.id as u32, p.name.clone()))
        .collect();
    let servers: BTreeMap<[u8; 4], String> = config
        .servers
        .iter()
        .map(|s| (s.fabric.octets(), s.name.clone()))
        .collect();
    let now = monotonic_ns();
    let mut rows = Vec::new();
    for (k, v) in flows.iter().filter_map(Result::ok) {
        if v.kind != FLOW_OUTBOUND && v.kind != FLOW_FORWARDED {
            continue; // reverse entries mirror outbound ones
        }
        let pool = pools
            .get(&v.pool)
            .cloned()
            .unwrap_or_else(|| format!("#{}", v.pool));
        let dst = addr(k.family, &k.dst);
        if args.pool.as_ref().is_some_and(|p| *p != pool) || args.dst.is_some_and(|d| d != dst) {
            continue;
        }
        let via = (v.tunnel != [0; 4]).then(|| {
            servers
                .get(&v.tunnel)
                .cloned()
                .unwrap_or_else(|| Ipv4Addr::from(v.tunnel).to_string())
        });
        let other = (v.kind == FLOW_OUTBOUND)
            .then(|| flows.get(&k.other_direction(&v), 0).ok())
            .flatten();
        let state = match State::of(&v, other.as_ref()) {
            State { rst: true, .. } => "reset",
            State { fin: true, .. } => "closing",
            State { replied: false, .. } => "unreplied",
            _ => "open",
        };
        rows.push(Row {
            state,
            proto: match k.proto {
                6 => "tcp",
                17 => "udp",
                1 => "icmp",
                58 => "icmp6",
                _ => "?",
            },
            pool,
            original: format!(
                "{} → {}",
                endpoint(addr(k.family, &k.src), k.src_port_be),
                endpoint(dst, k.dst_port_be)
            ),
            translated: (v.kind == FLOW_OUTBOUND)
                .then(|| endpoint(addr(k.family, &v.addr), v.port_be)),
            path: match (v.kind, via.is_some()) {
                (FLOW_FORWARDED, _) => "forwarded",
                (_, true) => "peer",
                _ => "local",
            },
            via,
            idle_s: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
        });
    }
    rows.sort_by(|a, b| (&a.pool, &a.original).cmp(&(&b.pool, &b.original)));
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Table => {
            println!(
                "{:<5} {:<8} {:<54} {:<28} {:<10} {:<9} {:<9} idle",
                "proto", "pool", "original", "translated", "path", "via", "state"
            );
            for r in &rows {
                println!(
                    "{:<5} {:<8} {:<54} {:<28} {:<10} {:<9} {:<9} {}s",
                    r.proto,
                    r.pool,
                    r.original,
                    r.translated.as_deref().unwrap_or("-"),
                    r.path,
                    r.via.as_deref().unwrap_or("-"),
                    r.state,
                    r.idle_s
                );
            }
            println!("{} connections", rows.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}
