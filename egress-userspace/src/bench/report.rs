//! The benchmark report: targets, markdown tables, the README section, a chart of the ratios.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use super::{Report, Target, e2e::Setup};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn row<'a>(r: &'a Report, s: Setup, load: &str) -> Option<&'a super::e2e::Row> {
    r.end_to_end.iter().find(|x| x.setup == s && x.load == load)
}

/// The targets we hold ourselves to, evaluated on this run.
pub fn targets(r: &Report) -> Vec<Target> {
    let mut t = Vec::new();
    let mut ratio = |name: String, goal: f64, value: f64| {
        t.push(Target {
            name,
            goal: format!("≥ {goal:.2}"),
            measured: format!("{value:.3}"),
            met: value >= goal,
        });
    };
    for x in &r.end_to_end {
        let goal = match (x.setup, x.load.contains("udp"), x.load.contains("64k")) {
            (Setup::Local, true, false) => 0.93,
            (Setup::Local, true, true) => 0.90,
            (Setup::Local, false, _) => 0.95,
            (Setup::Forward | Setup::ForwardXdp, _, _) => 0.85,
            _ => continue,
        };
        let against = if matches!(x.setup, Setup::Forward | Setup::ForwardXdp) {
            "two-hop routing"
        } else {
            "bare"
        };
        ratio(
            format!("{} / {against}, {}", x.setup_name, x.load),
            goal,
            x.ratio_to_bare,
        );
    }
    for (ours, theirs, what) in [
        (
            Setup::Local,
            Setup::Nftables,
            "local SNAT ahead of nftables",
        ),
        (
            Setup::Forward,
            Setup::TwoHopNftables,
            "forwarding ahead of two-hop nftables",
        ),
        (
            Setup::ForwardXdp,
            Setup::TwoHopNftables,
            "forwarding with XDP ahead of two-hop nftables",
        ),
    ] {
        for x in r.end_to_end.iter().filter(|x| x.setup == ours) {
            if let Some(nft) = row(r, theirs, x.load) {
                t.push(Target {
                    name: format!("{what}, {}", x.load),
                    goal: "dataplane > nftables".into(),
                    measured: format!("{:.0} vs {:.0} {}", x.median, nft.median, x.unit),
                    met: x.median > nft.median,
                });
            }
        }
    }
    for p in &r.per_packet {
        let (Some((_, most)), Some(ratio)) = (super::perpacket::reference_of(p.path), p.ratio)
        else {
            continue;
        };
        t.push(Target {
            name: format!(
                "per packet, {} ({} B), against {}",
                p.path,
                p.frame,
                p.reference.unwrap_or_default()
            ),
            goal: format!("≤ {most:.1}×"),
            measured: format!("×{ratio:.2} ({:.0} ns)", p.marginal_ns),
            met: ratio <= most,
        });
    }
    for h in &r.scale.housekeeping {
        t.push(Target {
            name: format!(
                "housekeeping pass, {} entries, against a batched dump",
                h.entries
            ),
            goal: "≤ 1.5×".into(),
            measured: format!(
                "×{:.2} ({:.0} ms vs {:.0} ms)",
                h.ratio, h.pass_ms, h.dump_ms
            ),
            met: h.ratio <= 1.5,
        });
    }
    let f = &r.fleet.tls;
    let ms = |v: f64| format!("{v:.0} ms");
    t.push(target(
        format!("fleet convergence, {} agents, TLS: p50", f.agents),
        "< 300 ms",
        ms(f.p50_ms),
        f.p50_ms < 300.0,
    ));
    t.push(target(
        format!("fleet convergence, {} agents, TLS: max", f.agents),
        "< 1 s",
        ms(f.max_ms),
        f.max_ms < 1000.0,
    ));
    for k in &r.failover.kinds {
        let name = |what: &str| format!("failover, {}: {what}", k.name);
        t.push(target(
            name("p50"),
            "< 1 s",
            ms(k.p50_ms),
            k.p50_ms < 1000.0,
        ));
        t.push(target(
            name("max"),
            "< 3 s",
            ms(k.max_ms),
            k.max_ms < 3000.0,
        ));
        t.push(target(
            name("attempts failed after the first success"),
            "0",
            k.late_failures.to_string(),
            k.late_failures == 0,
        ));
    }
    let pl = &r.scale.planner;
    let total = pl.validate_ms + pl.plan_ms + pl.map_contents_ms;
    t.push(Target {
        name: format!(
            "planner, {} servers / {} pools (validate + plan + map contents)",
            pl.servers, pl.pools
        ),
        goal: "< 1 s".into(),
        measured: format!("{total:.0} ms"),
        met: total < 1000.0,
    });
    t
}

fn target(name: String, goal: &str, measured: String, met: bool) -> Target {
    Target {
        name,
        goal: goal.into(),
        measured,
        met,
    }
}

/// The full report as markdown.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Benchmark report{}\n",
        if r.quick {
            " (quick smoke run: sizes and durations reduced)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "{} — kernel {}, {} CPUs, {}\n",
        r.date, r.machine.kernel, r.machine.cpus, r.machine.cpu_model
    );
    s.push_str(&end_to_end_table(r));
    s.push_str(&per_packet_table(r));
    s.push_str(&in_situ_table(r));
    s.push_str(&super::flood::markdown(&r.flood));
    s.push_str(&super::fleet::markdown(&r.fleet));
    s.push_str(&super::failover::markdown(&r.failover));
    let (pl, px, fl) = (&r.scale.planner, &r.scale.prefixes, &r.scale.flows);
    let _ = writeln!(s, "## Scale\n");
    let _ = writeln!(
        s,
        "- Planner, {} servers, {} pools, {} policies: validate {:.0} ms, plan {:.0} ms, map contents {:.0} ms; +{:.0} MiB resident.",
        pl.servers,
        pl.pools,
        pl.policies,
        pl.validate_ms,
        pl.plan_ms,
        pl.map_contents_ms,
        pl.rss_mib
    );
    let _ = writeln!(
        s,
        "- Policy trie with {} more /32 prefixes (filled in {:.1} s): no-match path {:.0} → {:.0} ns, new connection {:.0} → {:.0} ns (median single runs, before → after).",
        px.count,
        px.fill_s,
        px.no_match_small_ns,
        px.no_match_large_ns,
        px.new_flow_small_ns,
        px.new_flow_large_ns
    );
    let _ = writeln!(
        s,
        "- Flow table of {} entries (hash, preallocated): {:.1} MiB kernel memory, {:.0} bytes per entry.\n",
        fl.entries,
        fl.memlock_bytes as f64 / (1024.0 * 1024.0),
        fl.bytes_per_entry
    );
    for h in &r.scale.housekeeping {
        let _ = writeln!(
            s,
            "- Housekeeping pass over {} flow entries (collect, count, peer loads; on the collector thread): {:.0} ms, ×{:.2} a bare batched dump of the same map ({:.0} ms); +{:.1} MiB peak resident.",
            h.entries, h.pass_ms, h.ratio, h.dump_ms, h.peak_mib
        );
    }
    s.push('\n');
    let _ = writeln!(
        s,
        "## Targets\n\n| target | goal | measured | met |\n|---|---|---|---|"
    );
    for t in &r.targets {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            t.name,
            t.goal,
            t.measured,
            if t.met { "yes" } else { "**missed**" }
        );
    }
    let missed = r.targets.iter().filter(|t| !t.met).count();
    let _ = writeln!(
        s,
        "\n{} of {} targets met{}.",
        r.targets.len() - missed,
        r.targets.len(),
        if missed > 0 {
            "; the missed ones are marked"
        } else {
            ""
        }
    );
    s
}

fn end_to_end_table(r: &Report) -> String {
    let mut s = String::from(
        "## End to end (median of rounds; min–max; ratio to plain routing over the same hops: one hop from fra-a-1 for local SNAT and nftables; two hops, fra-a-2 via fra-a-1, for forwarding and the two-hop nftables row; the single-hop row from fra-a-2 for information)\n\n",
    );
    let setups: Vec<Setup> = Setup::ALL
        .into_iter()
        .filter(|x| r.end_to_end.iter().any(|y| y.setup == *x))
        .collect();
    let _ = write!(s, "| load |");
    for x in &setups {
        let _ = write!(s, " {} |", x.name());
    }
    let _ = writeln!(s, "\n|---|{}", "---|".repeat(setups.len()));
    let mut loads: Vec<&str> = r.end_to_end.iter().map(|x| x.load).collect();
    loads.dedup();
    let loads: Vec<&str> = loads.into_iter().fold(Vec::new(), |mut v, l| {
        if !v.contains(&l) {
            v.push(l);
        }
        v
    });
    for load in loads {
        let _ = write!(s, "| {load} |");
        for x in &setups {
            match row(r, *x, load) {
                Some(v) => {
                    let _ = write!(
                        s,
                        " {:.0} {} ({:.0}–{:.0}) **×{:.2}** |",
                        v.median, v.unit, v.min, v.max, v.ratio_to_bare
                    );
                }
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    s.push('\n');
    s
}

fn in_situ_table(r: &Report) -> String {
    let mut s = String::from(
        "## In situ (ns per run of each program, and its runs, while the end-to-end loads ran — a tail-called program's time counts to its caller — in one extra round with `kernel.bpf_stats_enabled`; summed over the lab's agents)\n\n",
    );
    let mut programs: Vec<&str> = r.in_situ.iter().map(|x| x.program.as_str()).collect();
    programs.sort_unstable();
    programs.dedup();
    let _ = write!(s, "| setup | load |");
    for p in &programs {
        let _ = write!(s, " {p} |");
    }
    let _ = writeln!(s, "\n|---|---|{}", "---|".repeat(programs.len()));
    let mut keys: Vec<(Setup, &str)> = r.in_situ.iter().map(|x| (x.setup, x.load)).collect();
    keys.dedup();
    for (setup, load) in keys {
        let _ = write!(s, "| {} | {load} |", setup.name());
        for p in &programs {
            match r
                .in_situ
                .iter()
                .find(|x| x.setup == setup && x.load == load && x.program == *p)
            {
                Some(x) => {
                    let _ = write!(s, " {:.0} ({} runs) |", x.ns_per_run, x.runs);
                }
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    s.push('\n');
    s
}

fn per_packet_table(r: &Report) -> String {
    per_packet_markdown(&r.per_packet)
}

/// The per-packet table of `rows`.
pub fn per_packet_markdown(rows: &[super::perpacket::PathCost]) -> String {
    let mut s = String::from(
        "## Per-packet cost (BPF_PROG_TEST_RUN; interquartile mean of single runs, which the kernel times in 10 ns steps; marginal over an empty TC program, for the XDP rows over an empty XDP program; in the 1500 B column, paths that encapsulate take 1486-byte frames, the largest that fits the tunnel; IPv6 rows take 74-byte frames in the 64 B column; ratio: to the reference program of the least work the path must do, measured in the same run)\n\n| path | 64 B marginal ns | 1500 B marginal ns | ratio 64 B | ratio 1500 B | against | 64 B typical (min–max) ns |\n|---|---|---|---|---|---|---|\n",
    );
    let mut by: BTreeMap<(&str, usize), &super::perpacket::PathCost> = BTreeMap::new();
    for p in rows {
        by.insert((p.path, p.frame), p);
    }
    let ratio = |p: &super::perpacket::PathCost| p.ratio.map_or("".into(), |x| format!("×{x:.2}"));
    let paths = super::perpacket::PATHS
        .iter()
        .copied()
        .chain(super::perpacket::REFERENCES.iter().map(|(n, _)| *n))
        .chain(std::iter::once(super::perpacket::EMPTY_XDP))
        .chain(super::perpacket::XDP_ROWS.iter().map(|(_, n)| *n))
        .chain(super::perpacket::TRACE_ROWS.iter().map(|(n, _)| *n));
    for path in paths {
        let (Some(a), Some(b)) = (by.get(&(path, 64)), by.get(&(path, 1500))) else {
            continue;
        };
        let against = a
            .reference
            .map_or("", |r| r.trim_start_matches("reference: "));
        let _ = writeln!(
            s,
            "| {path} | {:.0} | {:.0} | {} | {} | {against} | {:.0} ({:.0}–{:.0}) |",
            a.marginal_ns,
            b.marginal_ns,
            ratio(a),
            ratio(b),
            a.typical_ns,
            a.min_ns,
            a.max_ns
        );
    }
    s.push('\n');
    // For information: the paths that keep state against the least a lookup costs.
    let lookup = |frame| by.get(&("reference: lookup, rewrite", frame));
    let established = |frame| by.get(&("established SNAT", frame));
    if let (Some(l64), Some(l1500), Some(e64), Some(e1500)) =
        (lookup(64), lookup(1500), established(64), established(1500))
    {
        let _ = writeln!(
            s,
            "For information: established SNAT against `reference: lookup, rewrite` (one lookup in a table as large as the flow table, then the rewrite): ×{:.2} at 64 B, ×{:.2} at 1500 B.\n",
            e64.marginal_ns / l64.marginal_ns.max(1.0),
            e1500.marginal_ns / l1500.marginal_ns.max(1.0),
        );
    }
    s
}

/// The README's "Performance" section: generated from a run, with its date and machine.
pub fn performance_section(r: &Report) -> String {
    let mut s = format!(
        "Generated by `cargo xtask bench` on {} (kernel {}, {} CPUs, {}); full report in `target/bench/report.md`, chart in `target/bench/ratios.png`.\n\n",
        r.date, r.machine.kernel, r.machine.cpus, r.machine.cpu_model
    );
    s.push_str(&end_to_end_table(r).replacen("## ", "#### ", 1));
    s.push_str(&per_packet_table(r).replacen("## ", "#### ", 1));
    s.push_str(&in_situ_table(r).replacen("## ", "#### ", 1));
    s.push_str(&super::flood::markdown(&r.flood).replacen("## ", "#### ", 1));
    s.push_str(&super::fleet::markdown(&r.fleet).replacen("## ", "#### ", 1));
    s.push_str(&super::failover::markdown(&r.failover).replacen("## ", "#### ", 1));
    let missed: Vec<&Target> = r.targets.iter().filter(|t| !t.met).collect();
    let _ = writeln!(
        s,
        "{} of {} targets met.",
        r.targets.len() - missed.len(),
        r.targets.len()
    );
    for t in missed {
        let _ = writeln!(
            s,
            "- missed: {} — goal {}, measured {}",
            t.name, t.goal, t.measured
        );
    }
    s
}

/// Bars of every setup's ratio to bare routing, per load.
pub fn chart(r: &Report, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let font: &'static [u8] = Box::leak(std::fs::read(FONT)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("bad font {FONT}"))?;
    let setups = [
        Setup::Local,
        Setup::Nftables,
        Setup::Forward,
        Setup::TwoHopNftables,
    ];
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
    ];
    let mut loads: Vec<&str> = Vec::new();
    for x in &r.end_to_end {
        if !loads.contains(&x.load) {
            loads.push(x.load);
        }
    }
    let root = BitMapBackend::new(path, (1200, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = r
        .end_to_end
        .iter()
        .map(|x| x.ratio_to_bare)
        .filter(|v| v.is_finite())
        .fold(1.2, f64::max)
        + 0.25;
    let mut c = ChartBuilder::on(&root)
        .caption(
            "throughput ratio to bare routing (same run)",
            ("sans-serif", 26),
        )
        .margin(20)
        .x_label_area_size(70)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..loads.len() as f64, 0f64..top)?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(loads.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < loads.len() {
                loads[i].to_string()
            } else {
                String::new()
            }
        })
        .x_label_style(("sans-serif", 13))
        .y_desc("ratio")
        .draw()?;
    for (k, (s, color)) in setups.iter().zip(colors).enumerate() {
        let bars: Vec<Rectangle<(f64, f64)>> = loads
            .iter()
            .enumerate()
            .filter_map(|(i, l)| row(r, *s, l).map(|x| (i, x.ratio_to_bare)))
            .map(|(i, v)| {
                let x0 = i as f64 + 0.15 + k as f64 * 0.23;
                Rectangle::new([(x0, 0.0), (x0 + 0.21, v)], color.filled())
            })
            .collect();
        if bars.is_empty() {
            continue;
        }
        c.draw_series(bars)?
            .label(s.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    c.draw_series(std::iter::once(PathElement::new(
        vec![(0.0, 1.0), (loads.len() as f64, 1.0)],
        BLACK,
    )))?;
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}
