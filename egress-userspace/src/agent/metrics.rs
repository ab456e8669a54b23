//! The agent's Prometheus metrics: registered once (at the first scrape, when the agent's
//! parts are all known), their values set from the agent's state at each scrape. Values that
//! come from elsewhere are mirrored: the datapath counters from `STATS`, the flow table's from
//! the last housekeeping pass.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::Agent;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CounterLabel {
    counter: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabel {
    family: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SliceLabel {
    address: String,
    ports: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UrlLabel {
    url: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    server: String,
    fabric: String,
}

type Seconds = Gauge<f64, AtomicU64>;

/// Sets a counter that mirrors a total kept elsewhere (counters only go up).
fn mirror(c: &Counter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

/// Registers `metric` under `name` and hands it back.
fn add<M: prometheus_client::registry::Metric + Clone>(
    r: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    r.register(name, help, metric.clone());
    metric
}

pub(super) struct Metrics {
    registry: Registry,
    datapath_packets: Family<CounterLabel, Counter>,
    datapath_bytes: Family<CounterLabel, Counter>,
    flow_entries: Family<KindLabel, Gauge>,
    map_entries: Family<MapLabel, Gauge>,
    flow_capacity: Gauge,
    pass_seconds: Seconds,
    pass_filter: Family<FamilyLabel, Gauge>,
    early_dropped: Counter,
    collected: Counter,
    slice_used: Family<SliceLabel, Gauge>,
    slice_size: Family<SliceLabel, Gauge>,
    repairs: Counter,
    attached: Gauge,
    xdp_attached: Gauge,
    plan_generation: Gauge,
    reloads: Family<ResultLabel, Counter>,
    peer_up: Family<PeerLabel, Gauge>,
    peer_transitions: Family<PeerLabel, Counter>,
    peer_rtt: Family<PeerLabel, Seconds>,
    peer_resets: Counter,
    peer_connections: Family<PeerLabel, Gauge>,
    peer_budget: Gauge,
    fleet: Option<FleetMetrics>,
}

struct FleetMetrics {
    etcd_connected: Gauge,
    etcd_member: Family<UrlLabel, Gauge>,
    applied_revision: Gauge,
    plan_age: Gauge,
    plan_stale: Gauge,
    rejected: Counter,
    fenced: Gauge,
}

impl Metrics {
    /// Every metric, registered once; fleet mode's only with `fleet`.
    pub(super) fn new(fleet: bool) -> Metrics {
        let mut r = Registry::with_prefix("egress");
        let r = &mut r;
        let mut m = Metrics {
            datapath_packets: add(
                r,
                "datapath_packets",
                "Packets per datapath decision or drop (see egress stats)",
                Family::default(),
            ),
            datapath_bytes: add(
                r,
                "datapath_bytes",
                "Bytes per datapath decision or drop",
                Family::default(),
            ),
            flow_entries: add(
                r,
                "flow_entries",
                "Flow table entries by kind (at the last housekeeping)",
                Family::default(),
            ),
            map_entries: add(
                r,
                "map_entries",
                "Entries of the plan maps",
                Family::default(),
            ),
            flow_capacity: add(
                r,
                "flow_capacity",
                "Flow table size (entries; full, new connections are refused)",
                Gauge::default(),
            ),
            pass_seconds: add(
                r,
                "housekeeping_pass_seconds",
                "How long the last pass over the flow table took (on the collector thread)",
                Seconds::default(),
            ),
            pass_filter: add(
                r,
                "pass_filter_buckets",
                "Destination buckets (IPv4 /20s; IPv6: /32s hashed into as many buckets) whose packets tc_egress passes without a flow or policy lookup, of 1048576 per family (at the last plan switch or housekeeping)",
                Family::default(),
            ),
            early_dropped: add(
                r,
                "flows_early_dropped",
                "Unreplied connections removed early because the flow table was under pressure",
                Counter::default(),
            ),
            collected: add(
                r,
                "flows_collected",
                "Expired connections removed by the agent",
                Counter::default(),
            ),
            slice_used: add(
                r,
                "port_slice_used",
                "Distinct ports of a slice in use by live connections",
                Family::default(),
            ),
            slice_size: add(r, "port_slice_size", "Ports in a slice", Family::default()),
            repairs: add(
                r,
                "repairs",
                "Times pins or programs removed from under the agent were restored",
                Counter::default(),
            ),
            attached: add(
                r,
                "attached",
                "1 when the programs were found attached at the last check (every second)",
                Gauge::default(),
            ),
            xdp_attached: add(
                r,
                "xdp_attached",
                "1 when xdp_ingress runs on the uplink in front of the TC programs (--xdp, and the driver took it)",
                Gauge::default(),
            ),
            plan_generation: add(
                r,
                "plan_generation",
                "Plans applied since the agent started (1 = the initial one)",
                Gauge::default(),
            ),
            reloads: add(r, "reloads", "Config reloads by result", Family::default()),
            peer_up: add(
                r,
                "peer_up",
                "Fabric peers (GRE is accepted from these): 1 = up for new connections from here, 0 = down (probes missed, lease gone, or holding down)",
                Family::default(),
            ),
            peer_transitions: add(
                r,
                "peer_transitions",
                "Times a watched peer went down or came back up",
                Family::default(),
            ),
            peer_rtt: add(
                r,
                "peer_probe_rtt_seconds",
                "Round-trip time of the last answered fabric probe to a watched peer",
                Family::default(),
            ),
            peer_resets: add(
                r,
                "peer_connections_reset",
                "Connections removed because the peer they went through died (their sockets see a reset)",
                Counter::default(),
            ),
            peer_connections: add(
                r,
                "peer_connections",
                "Connections translated here for each peer (its budget: egress_peer_budget)",
                Family::default(),
            ),
            peer_budget: add(
                r,
                "peer_budget",
                "Most connections one peer may have translated here (0: no limit)",
                Gauge::default(),
            ),
            fleet: None,
            registry: Registry::default(),
        };
        if fleet {
            m.fleet = Some(FleetMetrics {
                etcd_connected: add(
                    r,
                    "etcd_connected",
                    "1 while the agent reads and watches the topology in etcd",
                    Gauge::default(),
                ),
                etcd_member: add(
                    r,
                    "etcd_member",
                    "1 for the etcd member (by its --etcd URL) the agent's session is on; none while it is on none",
                    Family::default(),
                ),
                applied_revision: add(
                    r,
                    "applied_revision",
                    "The published topology revision in force",
                    Gauge::default(),
                ),
                plan_age: add(
                    r,
                    "plan_age_seconds",
                    "Seconds since the plan in force was last known current (applied, or confirmed on reconnecting)",
                    Gauge::default(),
                ),
                plan_stale: add(
                    r,
                    "plan_stale_seconds",
                    "Seconds etcd has been unreachable (the plan may be stale); 0 when connected",
                    Gauge::default(),
                ),
                rejected: add(
                    r,
                    "rejected_revisions",
                    "Published revisions rejected as invalid (the last good plan stayed)",
                    Counter::default(),
                ),
                fenced: add(
                    r,
                    "fenced",
                    "1 while this server's lease could not be renewed in time: its probes are answered fenced and peers send it no new connections",
                    Gauge::default(),
                ),
            });
        }
        m.registry = std::mem::take(r);
        m
    }

    /// The text exposition of `a`'s state now.
    pub(super) fn render(&self, a: &Agent) -> anyhow::Result<String> {
        self.datapath(a)?;
        self.flows(a);
        self.plan(a);
        self.peers(a);
        self.fleet(a);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    fn datapath(&self, a: &Agent) -> anyhow::Result<()> {
        for (s, c) in a.counters()? {
            let l = CounterLabel {
                counter: s.name().to_string(),
            };
            mirror(&self.datapath_packets.get_or_create(&l), c.packets);
            mirror(&self.datapath_bytes.get_or_create(&l), c.bytes);
        }
        self.attached
            .set(i64::from(a.dp.as_ref().is_some_and(|d| d.attached)));
        self.xdp_attached
            .set(i64::from(a.dp.as_ref().is_some_and(|d| d.xdp)));
        mirror(&self.repairs, a.repairs);
        Ok(())
    }

    /// The flow table and port slices, as the last housekeeping pass found them.
    fn flows(&self, a: &Agent) {
        let o = &a.observed;
        self.flow_entries.clear();
        for (k, n) in &o.entries {
            self.flow_entries
                .get_or_create(&KindLabel {
                    kind: k.to_string(),
                })
                .set(*n);
        }
        self.flow_capacity.set(i64::from(a.flow_capacity));
        self.pass_seconds.set(o.pass_seconds);
        for (family, n) in [("ipv4", o.pass_filter.0), ("ipv6", o.pass_filter.1)] {
            self.pass_filter
                .get_or_create(&FamilyLabel {
                    family: family.into(),
                })
                .set(i64::from(n));
        }
        mirror(&self.early_dropped, o.early_dropped);
        mirror(&self.collected, o.collected);
        self.slice_used.clear();
        self.slice_size.clear();
        for s in &o.slices {
            let l = SliceLabel {
                address: s.address.to_string(),
                ports: format!("{}-{}", s.first, s.last),
            };
            self.slice_used.get_or_create(&l).set(i64::from(s.used));
            self.slice_size.get_or_create(&l).set(i64::from(s.size()));
        }
    }

    fn plan(&self, a: &Agent) {
        self.map_entries.clear();
        for (m, n) in &a.observed.map_entries {
            self.map_entries
                .get_or_create(&MapLabel { map: m.to_string() })
                .set(*n);
        }
        self.plan_generation.set(a.generation as i64);
        for (result, n) in [("ok", a.reloads_ok), ("failed", a.reloads_failed)] {
            let l = ResultLabel {
                result: result.into(),
            };
            mirror(&self.reloads.get_or_create(&l), n);
        }
    }

    /// Every fabric peer (up, its load here) and the watched ones (transitions, probe RTT).
    fn peers(&self, a: &Agent) {
        self.peer_up.clear();
        self.peer_connections.clear();
        for s in a
            .topology
            .config()
            .servers
            .iter()
            .filter(|s| s.name != a.server)
        {
            let l = PeerLabel {
                server: s.name.clone(),
                fabric: s.fabric.to_string(),
            };
            self.peer_up
                .get_or_create(&l)
                .set(i64::from(!a.down.contains_key(&s.name)));
            let n = a.observed.peer_load.get(&s.fabric).copied().unwrap_or(0);
            self.peer_connections.get_or_create(&l).set(n as i64);
        }
        if let Some(l) = &a.liveness {
            let l = l.lock().unwrap_or_else(|e| e.into_inner()).clone();
            // The watched set changes with the plan (a peer that leaves it starts over at 0
            // when it comes back): exactly the peers watched now, with their counts.
            self.peer_rtt.clear();
            self.peer_transitions.clear();
            for (fabric, p) in &l.peers {
                let label = PeerLabel {
                    server: p.name.clone(),
                    fabric: fabric.to_string(),
                };
                mirror(&self.peer_transitions.get_or_create(&label), p.transitions);
                if let Some(t) = p.rtt {
                    self.peer_rtt.get_or_create(&label).set(t.as_secs_f64());
                }
            }
        }
        mirror(&self.peer_resets, a.peer_resets);
        self.peer_budget.set(i64::from(a.peer_budget));
    }

    fn fleet(&self, a: &Agent) {
        let (Some(m), Some(f)) = (&self.fleet, &a.fleet) else {
            return;
        };
        let now = crate::fleet::unix_now();
        m.etcd_connected.set(i64::from(f.connected));
        m.etcd_member.clear();
        if let Some(url) = f.member.current() {
            m.etcd_member
                .get_or_create(&UrlLabel {
                    url: url.to_string(),
                })
                .set(1);
        }
        m.applied_revision.set(f.applied_revision);
        m.plan_age.set(now.saturating_sub(f.updated_at) as i64);
        m.plan_stale
            .set(f.stale_since.map_or(0, |s| now.saturating_sub(s)) as i64);
        mirror(&m.rejected, f.rejected_revisions);
        m.fenced.set(i64::from(f.fenced));
    }
}
