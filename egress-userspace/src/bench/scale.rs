//! Scale: policy lookups with many prefixes, flow-table memory, planner time and memory on a
//! generated fleet.

use std::{net::Ipv4Addr, time::Instant};

use ipnet::Ipv6Net;
use serde::Serialize;

use crate::{
    apply::Table as _,
    config::{Config, Datacenter, Location, Policy, Pool, PoolAddress, Server, Share},
    plan,
    testrun::{FIXTURE_TOPOLOGY, Hook, TestDatapath, TestNet, packet},
    validate,
};
use egress_common::policy::{MARK_BITS, PolicyKeyV4, PolicyValue};

#[derive(Debug, Clone, Serialize)]
pub struct Planner {
    pub servers: usize,
    pub pools: usize,
    pub policies: usize,
    pub validate_ms: f64,
    pub plan_ms: f64,
    pub map_contents_ms: f64,
    /// Resident memory added by the topology, plan and map contents (MiB).
    pub rss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Prefixes {
    pub count: usize,
    pub fill_s: f64,
    /// Median ns of a no-match lookup (full trie walk) and of a new connection (trie hit and
    /// port claim), with the fixture's two prefixes and with `count` more.
    pub no_match_small_ns: f64,
    pub no_match_large_ns: f64,
    pub new_flow_small_ns: f64,
    pub new_flow_large_ns: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Flows {
    pub entries: u32,
    /// Kernel memory of the (preallocated hash) flow table, from the map's fdinfo.
    pub memlock_bytes: u64,
    pub bytes_per_entry: f64,
}

/// One housekeeping pass over a full flow table (nothing expired), against a bare batched dump
/// of the same map in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Housekeeping {
    pub entries: u32,
    pub dump_ms: f64,
    pub pass_ms: f64,
    /// pass / dump.
    pub ratio: f64,
    /// Peak resident memory the pass added.
    pub peak_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scale {
    pub planner: Planner,
    pub prefixes: Prefixes,
    pub flows: Flows,
    pub housekeeping: Vec<Housekeeping>,
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A pass over `entries` flow entries (connections of two entries each, all fresh) in a table
/// twice that size (no pressure: under pressure every entry is looked at for early drop).
fn housekeeping(entries: u32) -> anyhow::Result<Housekeeping> {
    use egress_common::flow::{FLOW_OUTBOUND, FLOW_REVERSE, FlowKey, FlowValue};
    let capacity = entries * 2;
    let mut ebpf = aya::EbpfLoader::new()
        .map_max_entries(egress_common::map_names::FLOWS, capacity)
        .load(crate::loader::object())?;
    let map = ebpf
        .take_map(egress_common::map_names::FLOWS)
        .ok_or_else(|| anyhow::anyhow!("FLOWS map"))?;
    let mut flows: aya::maps::HashMap<_, FlowKey, FlowValue> = aya::maps::HashMap::try_from(map)?;
    let now = crate::flows::monotonic_ns();
    for i in 0..entries / 2 {
        let local = [10, 50, (i >> 16) as u8, (i >> 8) as u8];
        // Remote and translated port together unique for every i (the reverse keys must not
        // collide).
        let remote = [203, 0, (i >> 8) as u8, i as u8];
        let v4 = |a: [u8; 4]| {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a);
            b
        };
        let out = FlowKey {
            src: v4(local),
            dst: v4(remote),
            src_port_be: 40000u16.to_be(),
            dst_port_be: 443u16.to_be(),
            proto: 6,
            family: 4,
            _pad: [0; 2],
        };
        let mut ov = FlowValue::new(
            FLOW_OUTBOUND,
            v4([192, 0, 2, 10]),
            (1024 + (i % 60000) as u16).to_be(),
            7,
            [0; 4],
            now,
        );
        ov.flags = egress_common::flow::FLOW_F_REPLIED;
        let rk = out.other_direction(&ov);
        let mut rv = FlowValue::new(FLOW_REVERSE, out.src, out.src_port_be, 7, [0; 4], now);
        rv.flags = egress_common::flow::FLOW_F_REPLIED;
        flows.insert(out, ov, 0)?;
        flows.insert(rk, rv, 0)?;
    }
    // Counted key by key (no snapshot), so the first pass's memory is its own.
    let filled = flows.keys().count() as u32;
    // Alternating rounds, medians: one round of each is at the mercy of the scheduler.
    let (mut dumps, mut passes, mut peak_mib) = (Vec::new(), Vec::new(), 0f64);
    for round in 0..5 {
        // Peak resident memory of the first pass, before any dump left memory to reuse
        // (writing 5 to clear_refs resets VmHWM).
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let before = status_kib("VmRSS:");
        let p = crate::flows::pass(&mut flows, crate::flows::monotonic_ns(), capacity)?;
        if round == 0 {
            peak_mib = status_kib("VmHWM:").saturating_sub(before) as f64 / 1024.0;
        }
        let t0 = std::time::Instant::now();
        let dumped = crate::flows::dump(&flows)?;
        dumps.push(t0.elapsed().as_secs_f64() * 1e3);
        drop(dumped);
        anyhow::ensure!(
            p.collected.expired == 0 && p.collected.entries as u32 == filled,
            "the pass saw {} of {filled} entries",
            p.collected.entries
        );
        passes.push(p.took.as_secs_f64() * 1e3);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (dump_ms, pass_ms) = (median(&mut dumps), median(&mut passes));
    Ok(Housekeeping {
        entries: filled,
        dump_ms,
        pass_ms,
        ratio: pass_ms / dump_ms,
        peak_mib,
    })
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A fleet: `servers` servers in locations of 10 data centers × 10 servers, `pools` pools each
/// with one IPv4 address shared by two servers, an IPv6 prefix, and one /32 policy.
pub fn generated_fleet(servers: usize, pools: usize) -> Config {
    let per_loc = 100;
    let locations = servers.div_ceil(per_loc);
    let mut c = Config {
        server: None,
        locations: vec![],
        datacenters: vec![],
        servers: vec![],
        pools: vec![],
        policies: vec![],
    };
    for l in 0..locations {
        c.locations.push(Location {
            name: format!("l{l}"),
            latitude: -60.0 + (l as f64 * 7.3) % 120.0,
            longitude: -170.0 + (l as f64 * 13.7) % 340.0,
        });
        for d in 0..10 {
            c.datacenters.push(Datacenter {
                name: format!("l{l}-d{d}"),
                location: format!("l{l}"),
            });
        }
    }
    for s in 0..servers {
        let (l, d) = (s / per_loc, (s / 10) % 10);
        c.servers.push(Server {
            name: format!("s{s}"),
            id: s as u32 + 1,
            datacenter: format!("l{l}-d{d}"),
            fabric: Ipv4Addr::from(0x0a00_0000 + s as u32 + 1),
            uplink: "eth0".into(),
        });
    }
    for p in 0..pools {
        let a = (p * 7) % servers;
        let b = (p * 13 + servers / 2) % servers;
        let b = if b == a { (b + 1) % servers } else { b };
        c.pools.push(Pool {
            name: format!("p{p}"),
            id: p as u64 + 1,
            ipv6_prefix: Some(
                Ipv6Net::new(
                    std::net::Ipv6Addr::from((0x2001_0db8u128 << 96) | ((p as u128) << 64)),
                    64,
                )
                .expect("valid /64"),
            ),
            ipv4: vec![PoolAddress {
                address: Ipv4Addr::from(0x6440_0000 + p as u32),
                shares: vec![
                    Share {
                        server: format!("s{a}"),
                        ports: "1024-30000".into(),
                    },
                    Share {
                        server: format!("s{b}"),
                        ports: "30001-65535".into(),
                    },
                ],
            }],
        });
        c.policies.push(Policy {
            pool: format!("p{p}"),
            destinations: vec![Ipv4Addr::from(0xc612_0000 + p as u32).to_string()],
            mark: 0,
        });
    }
    c
}

fn planner(servers: usize, pools: usize) -> anyhow::Result<Planner> {
    let before = rss_kib();
    let c = generated_fleet(servers, pools);
    let t0 = Instant::now();
    let t = validate::validate(&c)?;
    let validate_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let p = plan::plan(&t, "s0");
    let plan_ms = t1.elapsed().as_secs_f64() * 1e3;
    let t2 = Instant::now();
    let m = plan::map_contents(&t, &p);
    let map_contents_ms = t2.elapsed().as_secs_f64() * 1e3;
    let rss_mib = (rss_kib().saturating_sub(before)) as f64 / 1024.0;
    anyhow::ensure!(
        p.entries.len() >= pools && m.policies_v4.len() == pools,
        "planned every pool"
    );
    Ok(Planner {
        servers,
        pools,
        policies: pools,
        validate_ms,
        plan_ms,
        map_contents_ms,
        rss_mib,
    })
}

fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    v[v.len() / 2] as f64
}

fn prefixes(count: usize, runs: usize) -> anyhow::Result<Prefixes> {
    std::thread::spawn(move || -> anyhow::Result<Prefixes> {
        let net = TestNet::enter();
        let mut dp = TestDatapath::fixture(&net, FIXTURE_TOPOLOGY)?;
        let miss = packet::build(
            "10.50.0.11".parse()?,
            "198.51.100.1".parse()?,
            packet::L4::Tcp {
                sport: 1,
                dport: 80,
                flags: packet::TCP_ACK,
            },
            &[],
        );
        let mut port = 0u16;
        let mut measure = |dp: &mut TestDatapath| -> anyhow::Result<(f64, f64)> {
            let m = (0..runs)
                .map(|_| Ok(dp.run(Hook::Egress, 0, &miss)?.duration.as_nanos() as u64))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let n = (0..runs)
                .map(|_| {
                    port = port.wrapping_add(1).max(1);
                    let syn = packet::build(
                        "10.50.0.11".parse()?,
                        "203.0.113.4".parse()?,
                        packet::L4::Tcp {
                            sport: 9,
                            dport: port,
                            flags: packet::TCP_SYN,
                        },
                        &[],
                    );
                    Ok(dp.run(Hook::Egress, 0, &syn)?.duration.as_nanos() as u64)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((median(m), median(n)))
        };
        let (no_match_small_ns, new_flow_small_ns) = measure(&mut dp)?;
        // Into the generation in force, where the programs look.
        let in_force = dp.maps.plan.generation.get(&0, 0)? & 1;
        let t0 = Instant::now();
        for i in 0..count as u32 {
            // /32s in 100.64.0.0/10, mark 0, pool 7.
            let key = (
                MARK_BITS + 32,
                PolicyKeyV4 {
                    gen_be: in_force.to_be(),
                    mark_be: 0,
                    addr: (0x6440_0000 + i).to_be_bytes(),
                },
            );
            dp.maps
                .plan
                .policies_v4
                .put(&key, &PolicyValue { pool: 7 })?;
        }
        let fill_s = t0.elapsed().as_secs_f64();
        let (no_match_large_ns, new_flow_large_ns) = measure(&mut dp)?;
        drop(net);
        Ok(Prefixes {
            count,
            fill_s,
            no_match_small_ns,
            no_match_large_ns,
            new_flow_small_ns,
            new_flow_large_ns,
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("prefix benchmark thread panicked"))?
}

fn flows(entries: u32) -> anyhow::Result<Flows> {
    let ebpf = aya::EbpfLoader::new()
        .map_max_entries(egress_common::map_names::FLOWS, entries)
        .load(crate::loader::object())?;
    let map = ebpf
        .map(egress_common::map_names::FLOWS)
        .ok_or_else(|| anyhow::anyhow!("FLOWS map"))?;
    let fd = match map {
        aya::maps::Map::HashMap(d) => {
            std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(d.fd()))
        }
        _ => anyhow::bail!("FLOWS is not a hash map"),
    };
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    let memlock_bytes: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no memlock in fdinfo"))?;
    Ok(Flows {
        entries,
        memlock_bytes,
        bytes_per_entry: memlock_bytes as f64 / f64::from(entries),
    })
}

pub fn measure(quick: bool) -> anyhow::Result<Scale> {
    let (servers, pools, prefix_count, flow_entries, runs) = if quick {
        (1_000, 10_000, 10_000, 100_000, 200)
    } else {
        (10_000, 100_000, 1_000_000, 1_000_000, 5_000)
    };
    let sizes: &[u32] = if quick {
        &[10_000]
    } else {
        &[100_000, 1_000_000]
    };
    Ok(Scale {
        planner: planner(servers, pools)?,
        prefixes: prefixes(prefix_count, runs)?,
        flows: flows(flow_entries)?,
        housekeeping: sizes
            .iter()
            .map(|&n| housekeeping(n))
            .collect::<anyhow::Result<_>>()?,
    })
}
