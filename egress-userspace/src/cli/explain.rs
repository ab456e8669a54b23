//! `egress explain`: why a destination leaves the way it does from one server.

use std::{net::IpAddr, process::ExitCode};

use aya::maps::{
    HashMap, Map,
    lpm_trie::{Key, LpmTrie},
};
use egress_common::{
    action::{Action, ActionKey, ActionKind, FAMILY_V4, FAMILY_V6},
    fabric::{AddrKey, Peer},
    map_names,
    policy::{PolicyKeyV4, PolicyKeyV6, PolicyValue, prefix_len},
};

use super::{ConfigArg, Format};
use crate::{config::Config, explain};

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
    /// The pass filter passes the destination's bucket: tc_egress sends it unchanged without
    /// a flow or policy lookup.
    passed_early: bool,
}

fn live(args: Args) -> anyhow::Result<ExitCode> {
    let config = args.config.load()?;
    let dir = super::pin_dir_of(&args.config, args.server.clone(), args.pin_dir.clone())?;
    let maps = Pinned::open(&dir)?;
    let (pool, direct) = maps.pool(args.dst, args.mark)?;
    let family = if args.dst.is_ipv4() {
        FAMILY_V4
    } else {
        FAMILY_V6
    };
    let action = match pool {
        Some(p) => maps.action(p, family)?,
        None => None,
    };
    let out = Live {
        destination: args.dst,
        mark: args.mark,
        pool,
        pool_name: pool
            .and_then(|p| pool_of(&config, p))
            .map(|q| q.name.clone()),
        fell_back_to_mark_0: direct.is_none() && pool.is_some(),
        action: action_word(action.as_ref()),
        snat: action.map_or_else(Vec::new, |a| {
            a.snat[..usize::from(a.snat_count).min(a.snat.len())]
                .iter()
                .map(|t| format!("{} {}-{}", address(family, t.addr), t.port_min, t.port_max))
                .collect()
        }),
        next_hops: action.map_or_else(Vec::new, |a| {
            a.hops[..usize::from(a.hop_count).min(a.hops.len())]
                .iter()
                .map(|h| server_of(&config, *h))
                .collect()
        }),
        skipped: maps.skipped(&config, pool)?,
        passed_early: maps.passed_early(args.dst)?,
    };
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&out)?),
        Format::Table => print_live(&out, &dir),
    }
    Ok(ExitCode::SUCCESS)
}

/// The maps an agent pinned, read in the plan generation in force (as the programs do).
struct Pinned<'a> {
    dir: &'a std::path::Path,
    g: u8,
}

impl<'a> Pinned<'a> {
    fn open(dir: &'a std::path::Path) -> anyhow::Result<Self> {
        let generation: aya::maps::Array<_, u32> = aya::maps::Array::try_from(Map::Array(
            super::open_pinned(dir, map_names::GENERATION)?,
        ))?;
        let g = (generation.get(&0, 0)? & 1) as u8;
        Ok(Self { dir, g })
    }

    fn map(&self, name: &str) -> anyhow::Result<aya::maps::MapData> {
        super::open_pinned(self.dir, name)
    }

    /// Whether the pass filter passes `dst` at once.
    fn passed_early(&self, dst: IpAddr) -> anyhow::Result<bool> {
        let array = aya::maps::Array::try_from(Map::Array(self.map(map_names::PASS_FILTER)?))?;
        let (family, addr) = egress_common::policy::family_and_bytes(dst);
        Ok(crate::filter::PassFilter::new(array).passes(family, &addr)?)
    }

    /// The pool of `dst` for `mark` by the programs' rule (the mark's policy, else mark 0's),
    /// and what the mark's own lookup found. A failed read is an error, not a miss.
    fn pool(&self, dst: IpAddr, mark: u32) -> anyhow::Result<(Option<u32>, Option<u32>)> {
        let (family, addr) = egress_common::policy::family_and_bytes(dst);
        if !egress_common::policy::coverable(family, &addr) {
            return Ok((None, None));
        }
        let (mut failed, mut direct) = (None, None);
        let pool = egress_common::policy::pool_for_mark(mark, |m| {
            let found = self.policy(dst, m).unwrap_or_else(|e| {
                failed.get_or_insert(e);
                None
            });
            if m == mark {
                direct = found;
            }
            found
        });
        match failed {
            Some(e) => Err(e),
            None => Ok((pool, direct)),
        }
    }

    /// The policy map's answer for `dst` under `mark` alone.
    fn policy(&self, dst: IpAddr, mark: u32) -> anyhow::Result<Option<u32>> {
        Ok(match dst {
            IpAddr::V4(a) => {
                let t: LpmTrie<_, PolicyKeyV4, PolicyValue> =
                    LpmTrie::try_from(Map::LpmTrie(self.map(map_names::POLICY_V4)?))?;
                let k = Key::new(prefix_len(32), PolicyKeyV4::new(self.g, mark, a.octets()));
                found(t.get(&k, 0))?.map(|v| v.pool)
            }
            IpAddr::V6(a) => {
                let t: LpmTrie<_, PolicyKeyV6, PolicyValue> =
                    LpmTrie::try_from(Map::LpmTrie(self.map(map_names::POLICY_V6)?))?;
                let k = Key::new(prefix_len(128), PolicyKeyV6::new(self.g, mark, a.octets()));
                found(t.get(&k, 0))?.map(|v| v.pool)
            }
        })
    }

    /// The action of `pool` for `family`.
    fn action(&self, pool: u32, family: u8) -> anyhow::Result<Option<Action>> {
        let m: HashMap<_, ActionKey, Action> =
            HashMap::try_from(Map::HashMap(self.map(map_names::ACTIONS)?))?;
        found(m.get(&ActionKey::in_gen(pool, family, self.g), 0))
    }

    /// The holders of `pool` this server's agent sees down (`PEERS` flags), and why.
    fn skipped(&self, config: &Config, pool: Option<u32>) -> anyhow::Result<Vec<String>> {
        let peers: HashMap<_, AddrKey, Peer> =
            HashMap::try_from(Map::HashMap(self.map(map_names::PEERS)?))?;
        let Some(q) = pool.and_then(|p| pool_of(config, p)) else {
            return Ok(Vec::new());
        };
        let holds = |s: &crate::config::Server| {
            q.ipv4
                .iter()
                .any(|a| a.shares.iter().any(|sh| sh.server == s.name))
        };
        let mut down = Vec::new();
        for s in config.servers.iter().filter(|s| holds(s)) {
            // Absent: this server itself (or not a peer); a failed read is an error, not "up".
            let key = AddrKey::new(s.fabric.octets(), self.g);
            let Some(peer) = found(peers.get(&key, 0))? else {
                continue;
            };
            if peer.flags != 0 {
                down.push(format!(
                    "{} ({}): {}",
                    s.name,
                    s.fabric,
                    crate::liveness::why::words(peer.flags)
                ));
            }
        }
        Ok(down)
    }
}

fn pool_of(config: &Config, id: u32) -> Option<&crate::config::Pool> {
    config.pools.iter().find(|q| q.id == u64::from(id))
}

/// A fabric address as its server's name (and the address), or the address alone.
fn server_of(config: &Config, fabric: [u8; 4]) -> String {
    config
        .servers
        .iter()
        .find(|s| s.fabric.octets() == fabric)
        .map_or_else(
            || std::net::Ipv4Addr::from(fabric).to_string(),
            |s| format!("{} ({})", s.name, s.fabric),
        )
}

fn address(family: u8, a: [u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([a[0], a[1], a[2], a[3]])
    } else {
        IpAddr::from(a)
    }
}

/// A map lookup's answer: absent is None, a failed read an error (not "no policy").
fn found<T>(r: Result<T, aya::maps::MapError>) -> anyhow::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn action_word(action: Option<&Action>) -> &'static str {
    match action.map(|a| ActionKind::from_u8(a.kind)) {
        None => "none",
        Some(Some(ActionKind::Snat)) => "snat",
        Some(Some(ActionKind::Forward)) => "forward",
        Some(Some(ActionKind::Drop)) => "drop",
        Some(None) => "unknown",
    }
}

fn print_live(out: &Live, dir: &std::path::Path) {
    println!(
        "live maps in {}: {} (mark {})",
        dir.display(),
        out.destination,
        out.mark
    );
    let Some(p) = out.pool else {
        println!("no policy covers it: sent unchanged from the server's own address");
        if out.passed_early {
            println!(
                "pass filter: passed at once (no policy, pool address or flow entry in its bucket)"
            );
        }
        return;
    };
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
