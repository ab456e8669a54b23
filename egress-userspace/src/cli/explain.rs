//! `egress explain`: why a destination leaves the way it does from one server.

use std::{net::IpAddr, process::ExitCode};

use super::{ConfigArg, Format};
use crate::explain;

/// Say which policy, pool, tier and next hops apply to a destination, and why.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArg,
    /// The server the connection starts on (default: the config's `server`).
    #[arg(long)]
    server: Option<String>,
    /// The destination address.
    #[arg(long)]
    dst: IpAddr,
    /// The socket's mark (tenant id, SO_MARK).
    #[arg(long, default_value_t = 0)]
    mark: u32,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Answer from the maps a running (or stopped) agent pinned, not from the config.
    #[arg(long)]
    live: bool,
    /// With --live: the pin directory (default: that of --server).
    #[arg(long, value_name = "DIR", requires = "live")]
    pin_dir: Option<std::path::PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.live {
        return live(args);
    }
    let t = args.config.topology()?;
    let server = t
        .config()
        .select_server(args.server.as_deref())?
        .name
        .clone();
    let e = explain::explain(&t, &server, args.dst, args.mark);
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&e)?),
        Format::Table => {
            println!("{} → {} (mark {})", e.server, e.destination, e.mark);
            if let Some(m) = &e.matched {
                println!(
                    "policy:  policies[{}] mark {} {} → pool {}{}",
                    m.policy,
                    m.mark,
                    m.destination,
                    m.pool,
                    if m.fell_back_to_mark_0 {
                        " (no rule for this mark: mark 0's)"
                    } else {
                        ""
                    }
                );
            }
            if let Some(en) = &e.entry {
                println!("tier:    {} ({:?})", en.tier.as_str(), en.action);
                for h in &en.next_hops {
                    println!("next hop {} {}", h.server, h.fabric);
                }
            }
            println!("why:     {}", e.why);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What the pinned maps say about a destination.
#[derive(Debug, serde::Serialize)]
struct Live {
    destination: IpAddr,
    mark: u32,
    /// None: no policy in the maps covers it.
    pool: Option<u32>,
    pool_name: Option<String>,
    fell_back_to_mark_0: bool,
    /// snat, forward, drop, or none (no action for the pool and family).
    action: &'static str,
    snat: Vec<String>,
    next_hops: Vec<String>,
    /// Holders of the pool this server sees down, skipped as next hops, and why.
    skipped: Vec<String>,
}

fn live(args: Args) -> anyhow::Result<ExitCode> {
    use aya::maps::{
        HashMap, Map,
        lpm_trie::{Key, LpmTrie},
    };
    use egress_common::{
        action::{Action, ActionKey, ActionKind, FAMILY_V4, FAMILY_V6},
        map_names,
        policy::{PolicyKeyV4, PolicyKeyV6, PolicyValue, prefix_len},
    };
    let config = args.config.load()?;
    let dir = super::pin_dir_of(&args.config, args.server.clone(), args.pin_dir.clone())?;
    let open = |name: &str| super::open_pinned(&dir, name);
    // The plan generation in force: every key below is looked up in it, as the programs do.
    let generation: aya::maps::Array<_, u32> =
        aya::maps::Array::try_from(Map::Array(open(map_names::GENERATION)?))?;
    let g = generation.get(&0, 0)? & 1;
    let lookup = |mark: u32| -> anyhow::Result<Option<u32>> {
        Ok(match args.dst {
            IpAddr::V4(a) => {
                let t: LpmTrie<_, PolicyKeyV4, PolicyValue> =
                    LpmTrie::try_from(Map::LpmTrie(open(map_names::POLICY_V4)?))?;
                let k = Key::new(prefix_len(32), PolicyKeyV4::new(g as u8, mark, a.octets()));
                t.get(&k, 0).ok().map(|v| v.pool)
            }
            IpAddr::V6(a) => {
                let t: LpmTrie<_, PolicyKeyV6, PolicyValue> =
                    LpmTrie::try_from(Map::LpmTrie(open(map_names::POLICY_V6)?))?;
                let k = Key::new(prefix_len(128), PolicyKeyV6::new(g as u8, mark, a.octets()));
                t.get(&k, 0).ok().map(|v| v.pool)
            }
        })
    };
    // The programs' rule, over the maps in force (a failed read is an error, not a miss).
    let mut failed = None;
    let mut direct = None;
    let pool = egress_common::policy::pool_for_mark(args.mark, |m| {
        let found = lookup(m).unwrap_or_else(|e| {
            failed.get_or_insert(e);
            None
        });
        if m == args.mark {
            direct = found;
        }
        found
    });
    if let Some(e) = failed {
        return Err(e);
    }
    let family = if args.dst.is_ipv4() {
        FAMILY_V4
    } else {
        FAMILY_V6
    };
    let action: Option<Action> = match pool {
        Some(p) => {
            let m: HashMap<_, ActionKey, Action> =
                HashMap::try_from(Map::HashMap(open(map_names::ACTIONS)?))?;
            m.get(&ActionKey::in_gen(p, family, g as u8), 0).ok()
        }
        None => None,
    };
    // The peers this server's agent sees down (PEERS flags in the generation in force).
    let peers: HashMap<_, egress_common::fabric::AddrKey, egress_common::fabric::Peer> =
        HashMap::try_from(Map::HashMap(open(map_names::PEERS)?))?;
    let holders: Vec<&crate::config::Server> = pool
        .and_then(|p| config.pools.iter().find(|q| q.id == u64::from(p)))
        .map(|q| {
            config
                .servers
                .iter()
                .filter(|s| {
                    q.ipv4
                        .iter()
                        .any(|a| a.shares.iter().any(|sh| sh.server == s.name))
                })
                .collect()
        })
        .unwrap_or_default();
    let skipped: Vec<String> = holders
        .iter()
        .filter_map(|s| {
            let key = egress_common::fabric::AddrKey::new(s.fabric.octets(), g as u8);
            let flags = peers.get(&key, 0).ok()?.flags;
            (flags != 0).then(|| {
                format!(
                    "{} ({}): {}",
                    s.name,
                    s.fabric,
                    crate::liveness::why::words(flags)
                )
            })
        })
        .collect();
    let server_of = |f: [u8; 4]| {
        config
            .servers
            .iter()
            .find(|s| s.fabric.octets() == f)
            .map_or_else(
                || std::net::Ipv4Addr::from(f).to_string(),
                |s| format!("{} ({})", s.name, s.fabric),
            )
    };
    let addr = |a: [u8; 16]| {
        if family == FAMILY_V4 {
            IpAddr::from([a[0], a[1], a[2], a[3]])
        } else {
            IpAddr::from(a)
        }
    };
    let out = Live {
        destination: args.dst,
        mark: args.mark,
        pool,
        pool_name: pool.and_then(|p| {
            config
                .pools
                .iter()
                .find(|q| q.id == u64::from(p))
                .map(|q| q.name.clone())
        }),
        fell_back_to_mark_0: direct.is_none() && pool.is_some(),
        action: match action.map(|a| ActionKind::from_u8(a.kind)) {
            None => "none",
            Some(Some(ActionKind::Snat)) => "snat",
            Some(Some(ActionKind::Forward)) => "forward",
            Some(Some(ActionKind::Drop)) => "drop",
            Some(None) => "unknown",
        },
        snat: action.map_or_else(Vec::new, |a| {
            a.snat[..usize::from(a.snat_count).min(a.snat.len())]
                .iter()
                .map(|t| format!("{} {}-{}", addr(t.addr), t.port_min, t.port_max))
                .collect()
        }),
        next_hops: action.map_or_else(Vec::new, |a| {
            a.hops[..usize::from(a.hop_count).min(a.hops.len())]
                .iter()
                .map(|h| server_of(*h))
                .collect()
        }),
        skipped,
    };
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&out)?),
        Format::Table => {
            println!(
                "live maps in {}: {} (mark {})",
                dir.display(),
                out.destination,
                out.mark
            );
            match out.pool {
                None => {
                    println!("no policy covers it: sent unchanged from the server's own address")
                }
                Some(p) => {
                    println!(
                        "pool {} ({}){}",
                        p,
                        out.pool_name.as_deref().unwrap_or("not in this config"),
                        if out.fell_back_to_mark_0 {
                            ", by mark 0's rule"
                        } else {
                            ""
                        }
                    );
                    println!(
                        "action: {} {}{}",
                        out.action,
                        out.snat.join(", "),
                        out.next_hops.join(", ")
                    );
                    for s in &out.skipped {
                        println!("skipped (down): {s}");
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
