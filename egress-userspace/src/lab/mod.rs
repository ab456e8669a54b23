//! The lab: a topology of network namespaces built from a config, for the tests and the demo.
//!
//! One namespace per server (its uplink carries the server's fabric address), one "origin"
//! namespace standing for the internet, and a "fabric" namespace holding the bridge that joins
//! them. Every interface is created inside the lab's namespaces; nothing touches the host's own
//! interfaces or routes, and no namespace has a route out of the lab. Names carry a per-run
//! prefix; dropping the [`Lab`] (also while panicking) kills what it started and removes
//! everything, and [`down_leftovers`] removes what crashed runs left behind.

pub mod attempts;
pub mod fleet;
pub mod netns;
pub mod origin;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use log::{debug, warn};

use crate::{config::Config, loader::DEFAULT_PIN_ROOT};

/// Every lab namespace, pin directory and work directory starts with this.
pub const LAB_PREFIX: &str = "egresslab-";

/// The origin's addresses. Servers route the whole documentation prefixes to it.
pub const ORIGIN_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// A second origin address under the default policy, for checks that must not share a remote
/// endpoint with other traffic.
pub const ORIGIN_V4_CHECK: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// An origin address in 203.0.113.128/25 (the default config's `beta` policy).
pub const ORIGIN_V4_HIGH: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 200);
/// An origin address no default policy covers (traffic leaves from the server's own address).
pub const ORIGIN_V4_NO_POLICY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const ORIGIN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbeef, 0, 0, 0, 0, 1);
pub const ORIGIN_V6_NO_POLICY: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xcafe, 0, 0, 0, 0, 1);
/// Every address the origin answers on.
pub const ORIGIN_ADDRESSES: [std::net::IpAddr; 6] = [
    std::net::IpAddr::V4(ORIGIN_V4),
    std::net::IpAddr::V4(ORIGIN_V4_CHECK),
    std::net::IpAddr::V4(ORIGIN_V4_HIGH),
    std::net::IpAddr::V4(ORIGIN_V4_NO_POLICY),
    std::net::IpAddr::V6(ORIGIN_V6),
    std::net::IpAddr::V6(ORIGIN_V6_NO_POLICY),
];
const INTERNET_ROUTES: [&str; 4] = [
    "203.0.113.0/24",
    "198.51.100.0/24",
    "2001:db8:beef::/48",
    "2001:db8:cafe::/48",
];
pub const HTTP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 7;

/// The fabric: servers' IPv4 fabric addresses must lie in 10.50.0.0/16; IPv6 fabric addresses
/// are fd00:50::<server id>.
const FABRIC_V4_LEN: u8 = 16;
const FABRIC_V4_NET: [u8; 2] = [10, 50];
const ORIGIN_FABRIC_V4: Ipv4Addr = Ipv4Addr::new(10, 50, 255, 254);
const ORIGIN_FABRIC_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0xffff);

/// A server's IPv6 address on the fabric.
pub fn fabric_v6(id: u32) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, (id >> 16) as u16, id as u16)
}

/// The origin's answer: the source address and port it saw.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Seen {
    pub src: String,
    pub port: u16,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub config: Config,
    /// Which server the origin routes each pool IPv4 address to (what BGP would pick). Addresses
    /// not listed go to the first server holding a share of them.
    pub announce: BTreeMap<Ipv4Addr, String>,
    /// The `egress` binary (agent and origin).
    pub egress_bin: PathBuf,
    /// MTU of every fabric link (default [`INTERNET_MTU`]). Above it, the routes towards the
    /// internet (servers) and towards pool addresses (origin) keep [`INTERNET_MTU`]: a
    /// data-centre fabric with room for the tunnel's 28 bytes, as forwarded fragments need.
    pub fabric_mtu: u32,
}

/// The MTU of paths to and from the internet in the lab.
pub const INTERNET_MTU: u32 = 1500;

impl LabSpec {
    pub fn new(config: Config, egress_bin: impl Into<PathBuf>) -> Self {
        Self {
            config,
            announce: BTreeMap::new(),
            egress_bin: egress_bin.into(),
            fabric_mtu: INTERNET_MTU,
        }
    }
}

/// A process the lab started and will stop.
struct Proc {
    label: String,
    child: Child,
}

/// A running lab. Dropping it tears everything down unless [`Lab::persist`] was called.
pub struct Lab {
    pub prefix: String,
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    pin_root: PathBuf,
    work_dir: PathBuf,
    config: Config,
    egress_bin: PathBuf,
    keep: bool,
    /// The control network and its etcd cluster, once started.
    fleet: Option<fleet::FleetLab>,
}

/// A fresh per-run prefix: pid, a per-process counter (labs built at the same instant by
/// parallel tests must not share a prefix: one's cleanup would remove the other's files), and
/// a little of the clock against pid reuse across runs.
fn unique_prefix() -> String {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{LAB_PREFIX}{:x}n{n:x}{:03x}",
        std::process::id(),
        nanos & 0xfff
    )
}

impl Lab {
    /// Builds the lab. On failure everything made so far is removed.
    pub fn up(spec: LabSpec) -> anyhow::Result<Lab> {
        let prefix = unique_prefix();
        let mut lab = Lab {
            pin_root: Path::new(DEFAULT_PIN_ROOT).join(&prefix),
            work_dir: std::env::temp_dir().join(&prefix),
            prefix,
            namespaces: Vec::new(),
            procs: Vec::new(),
            config: spec.config.clone(),
            egress_bin: spec.egress_bin.clone(),
            keep: false,
            fleet: None,
        };
        std::fs::create_dir_all(&lab.work_dir)?;
        std::fs::write(lab.config_path(), toml::to_string(&spec.config)?)?;
        lab.build(&spec)
            .with_context(|| format!("building lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn build(&mut self, spec: &LabSpec) -> anyhow::Result<()> {
        let fabric = self.add_ns("fabric")?;
        netns::ip_in(&fabric, &["link", "add", "fab", "type", "bridge"])?;
        netns::ip_in(&fabric, &["link", "set", "fab", "up"])?;

        let origin = self.add_ns("origin")?;
        self.plug(&origin, "p-origin", "eth0", spec.fabric_mtu)?;
        self.address(
            &origin,
            "eth0",
            &format!("{ORIGIN_FABRIC_V4}/{FABRIC_V4_LEN}"),
        )?;
        self.address(&origin, "eth0", &format!("{ORIGIN_FABRIC_V6}/64"))?;
        for a in ORIGIN_ADDRESSES {
            let len = if a.is_ipv4() { 32 } else { 128 };
            self.address(&origin, "lo", &format!("{a}/{len}"))?;
        }

        for server in &spec.config.servers {
            let o = server.fabric.octets();
            if o[..2] != FABRIC_V4_NET {
                bail!(
                    "server {}: fabric address {} is outside the lab fabric 10.50.0.0/16",
                    server.name,
                    server.fabric
                );
            }
            let ns = self.add_ns(&format!("s-{}", server.name))?;
            self.plug(
                &ns,
                &format!("p-{}", server.id),
                &server.uplink,
                spec.fabric_mtu,
            )?;
            self.address(
                &ns,
                &server.uplink,
                &format!("{}/{FABRIC_V4_LEN}", server.fabric),
            )?;
            self.address(&ns, &server.uplink, &format!("{}/64", fabric_v6(server.id)))?;
            for net in INTERNET_ROUTES {
                let via = if net.contains(':') {
                    ORIGIN_FABRIC_V6.to_string()
                } else {
                    ORIGIN_FABRIC_V4.to_string()
                };
                add_route(&ns, net, &via, spec.fabric_mtu)?;
            }
        }
        self.route_pools(spec)?;
        self.start_origin()
    }

    /// The origin's routes to pool addresses: each IPv4 address to its announcing server, each
    /// server's IPv6 pool address to that server.
    fn route_pools(&self, spec: &LabSpec) -> anyhow::Result<()> {
        let origin = self.origin_ns();
        let servers: BTreeMap<&str, &crate::config::Server> = spec
            .config
            .servers
            .iter()
            .map(|s| (s.name.as_str(), s))
            .collect();
        for pool in &spec.config.pools {
            for addr in &pool.ipv4 {
                let Some(name) = spec
                    .announce
                    .get(&addr.address)
                    .map(String::as_str)
                    .or_else(|| addr.shares.first().map(|s| s.server.as_str()))
                else {
                    continue; // reserved address: nobody announces it
                };
                let server = servers
                    .get(name)
                    .ok_or_else(|| anyhow!("pool {}: unknown server {name}", pool.name))?;
                add_route(
                    &origin,
                    &format!("{}/32", addr.address),
                    &server.fabric.to_string(),
                    spec.fabric_mtu,
                )?;
            }
            if let Some(prefix) = pool.ipv6_prefix {
                for server in &spec.config.servers {
                    let addr = crate::config::server_ipv6(prefix, server.id);
                    netns::ip_in(
                        &origin,
                        &[
                            "route",
                            "add",
                            &format!("{addr}/128"),
                            "via",
                            &fabric_v6(server.id).to_string(),
                        ],
                    )?;
                }
            }
        }
        Ok(())
    }

    fn add_ns(&mut self, role: &str) -> anyhow::Result<String> {
        let name = format!("{}-{role}", self.prefix);
        netns::ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        netns::ip_in(&name, &["link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// A veth from the fabric bridge (`port`) to `ns` (`iface`), both created inside the lab,
    /// both of MTU `mtu`.
    fn plug(&self, ns: &str, port: &str, iface: &str, mtu: u32) -> anyhow::Result<()> {
        let fabric = self.fabric_ns();
        let mtu = mtu.to_string();
        netns::ip_in(
            &fabric,
            &[
                "link", "add", port, "mtu", &mtu, "type", "veth", "peer", "name", iface, "mtu",
                &mtu, "netns", ns,
            ],
        )?;
        netns::ip_in(&fabric, &["link", "set", port, "master", "fab", "up"])?;
        netns::ip_in(ns, &["link", "set", iface, "up"])?;
        Ok(())
    }

    fn address(&self, ns: &str, iface: &str, cidr: &str) -> anyhow::Result<()> {
        let mut args = vec!["addr", "add", cidr, "dev", iface];
        if cidr.contains(':') {
            args.push("nodad"); // usable at once, no duplicate detection delay
        }
        netns::ip_in(ns, &args).map(drop)
    }

    fn start_origin(&mut self) -> anyhow::Result<()> {
        let mut cmd = netns::command_in(&self.origin_ns(), path_str(&self.egress_bin)?);
        cmd.args(["lab", "origin", "--log"])
            .arg(self.origin_log_path())
            .args([
                "--http-port",
                &HTTP_PORT.to_string(),
                "--udp-port",
                &UDP_PORT.to_string(),
            ]);
        self.spawn_until_ready("origin", cmd)
    }

    /// Spawns `cmd` with stderr appended to `<work dir>/<label>.log`, and waits (10 s at most)
    /// for a new line there containing "ready". A process that exits first fails with its log.
    fn spawn_until_ready(&mut self, label: &str, mut cmd: Command) -> anyhow::Result<()> {
        let log_path = self.log_path(label);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let from = log.metadata()?.len() as usize;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {label}: {cmd:?}"))?;
        self.procs.push(Proc {
            label: label.to_string(),
            child,
        });
        let waited = self.wait_for_log(label, from, &["ready"], Duration::from_secs(10));
        let proc = self.procs.last_mut().expect("just pushed");
        match waited {
            Ok(_) => Ok(()),
            Err(e) => {
                if let Ok(Some(status)) = proc.child.try_wait() {
                    self.procs.pop();
                    bail!("{label} exited ({status}) before it was ready: {e:#}");
                }
                Err(e)
            }
        }
    }

    /// Waits until `<label>.log`, after byte `from`, has a line containing one of `needles`;
    /// returns that line.
    pub fn wait_for_log(
        &self,
        label: &str,
        from: usize,
        needles: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let path = self.log_path(label);
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let new = text.get(from..).unwrap_or("");
            if let Some(line) = new.lines().find(|l| needles.iter().any(|n| l.contains(n))) {
                return Ok(line.to_string());
            }
            let exited = self
                .procs
                .iter()
                .find(|p| p.label == label)
                .is_none_or(|p| {
                    std::fs::read_to_string(format!("/proc/{}/stat", p.child.id()))
                        .is_ok_and(|s| s.contains(") Z "))
                });
            if exited || Instant::now() > deadline {
                bail!(
                    "{label}: no line with {needles:?} within {timeout:?}; it said:\n{}",
                    new.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Current length of a process's log (to wait for what it says next).
    pub fn log_len(&self, label: &str) -> usize {
        std::fs::metadata(self.log_path(label)).map_or(0, |m| m.len() as usize)
    }

    /// Where a started process's stderr goes.
    pub fn log_path(&self, label: &str) -> PathBuf {
        self.work_dir.join(format!("{label}.log"))
    }

    /// Starts the agent of `server` in its namespace, with the lab's config and a pin directory
    /// under the lab's pin root, and waits until it has attached.
    pub fn start_agent(&mut self, server: &str) -> anyhow::Result<()> {
        self.start_agent_with(server, &[])
    }

    /// Makes `server`'s link from the fabric what a NIC would give an XDP program: the bridge's
    /// end (`p-<id>`) completes checksums before sending (transmit checksum offload off: a
    /// veth otherwise hands on CHECKSUM_PARTIAL packets, whose L4 checksum field holds only
    /// the pseudo-header sum), and runs an XDP program itself (one that passes everything),
    /// without which a veth leaves the frames its peer transmits back (XDP_TX) in its ring.
    pub fn prepare_xdp(&mut self, server: &str) -> anyhow::Result<()> {
        let port = self.port_of(server)?;
        self.run(&self.fabric_ns(), "ethtool", &["-K", &port, "tx", "off"])?;
        let mut cmd = netns::command_in(&self.fabric_ns(), path_str(&self.egress_bin)?);
        cmd.args(["lab", "xdp-pass", &port]);
        self.spawn_until_ready(&format!("xdp-pass-{port}"), cmd)
    }

    /// Undoes [`Lab::prepare_xdp`]: the bridge's end of `server`'s link back as it was built.
    pub fn unprepare_xdp(&mut self, server: &str) -> anyhow::Result<()> {
        let port = self.port_of(server)?;
        self.stop(&format!("xdp-pass-{port}"))?;
        self.run(&self.fabric_ns(), "ethtool", &["-K", &port, "tx", "on"])
            .map(drop)
    }

    /// Server `server` of the lab's config.
    fn server(&self, server: &str) -> anyhow::Result<&crate::config::Server> {
        self.config
            .servers
            .iter()
            .find(|s| s.name == server)
            .ok_or_else(|| anyhow!("no server {server} in the lab"))
    }

    /// The bridge port of `server`'s link (`p-<id>`).
    fn port_of(&self, server: &str) -> anyhow::Result<String> {
        let id = self.server(server)?.id;
        Ok(format!("p-{id}"))
    }

    /// [`Lab::start_agent`] with `--xdp`, its link prepared first ([`Lab::prepare_xdp`]).
    pub fn start_agent_xdp(&mut self, server: &str) -> anyhow::Result<()> {
        self.prepare_xdp(server)?;
        self.start_agent_with(server, &["--xdp"])
    }

    /// [`Lab::start_agent`] with extra agent arguments (e.g. `--peer-budget 100`).
    pub fn start_agent_with(&mut self, server: &str, extra: &[&str]) -> anyhow::Result<()> {
        let mut cmd = netns::command_in(&self.server_ns(server), path_str(&self.egress_bin)?);
        cmd.arg("agent")
            .arg("--config")
            .arg(self.config_path())
            .args(["--server", server, "--pin-dir"])
            .arg(self.pin_dir(server))
            .args(extra);
        self.spawn_until_ready(&format!("agent-{server}"), cmd)
    }

    /// Starts a background process in `ns` (stderr to `<label>.log`) without waiting for it.
    pub fn spawn(
        &mut self,
        label: &str,
        ns: &str,
        program: &str,
        args: &[&str],
    ) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.log_path(label))?;
        let child = netns::command_in(ns, program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {program} in {ns}"))?;
        self.procs.push(Proc {
            label: label.to_string(),
            child,
        });
        Ok(())
    }

    /// A second origin at `addr` (a policy destination in 203.0.113.0/24) behind the origin,
    /// which routes to it over a link whose MTU is `mtu` on the origin's side (1500 on the far
    /// side, so the far origin advertises a full MSS): full-size packets with DF make the origin
    /// send "fragmentation needed", as a router on the path would. Answers as the origin does.
    pub fn add_far_origin(&mut self, addr: Ipv4Addr, mtu: u32) -> anyhow::Result<()> {
        let origin = self.origin_ns();
        let far = self.add_ns("far")?;
        netns::ip_in(
            &origin,
            &[
                "link",
                "add",
                "far0",
                "mtu",
                &mtu.to_string(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &far,
            ],
        )?;
        for (ns, iface, cidr) in [
            (&origin, "far0", "10.51.0.1/30"),
            (&far, "eth0", "10.51.0.2/30"),
        ] {
            self.address(ns, iface, cidr)?;
            netns::ip_in(ns, &["link", "set", iface, "up"])?;
        }
        self.address(&far, "lo", &format!("{addr}/32"))?;
        netns::ip_in(
            &origin,
            &["route", "add", &format!("{addr}/32"), "via", "10.51.0.2"],
        )?;
        for net in ["10.50.0.0/16", "192.0.2.0/24"] {
            netns::ip_in(&far, &["route", "add", net, "via", "10.51.0.1"])?;
        }
        let out = netns::command_in(&origin, "sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"])
            .output()?;
        netns::check("sysctl ip_forward", out)?;
        let mut cmd = netns::command_in(&far, path_str(&self.egress_bin)?);
        cmd.args(["lab", "origin", "--log"])
            .arg(self.work_dir.join("far-requests.log"))
            .args([
                "--http-port",
                &HTTP_PORT.to_string(),
                "--udp-port",
                &UDP_PORT.to_string(),
            ]);
        self.spawn_until_ready("far-origin", cmd)
    }

    /// Makes the origin route pool address `addr` to `server` from now on, as a change of BGP
    /// announcement would: replies to that address arrive there.
    pub fn announce(&self, addr: Ipv4Addr, server: &str) -> anyhow::Result<()> {
        let fabric = self.server(server)?.fabric;
        netns::ip_in(
            &self.origin_ns(),
            &[
                "route",
                "replace",
                &format!("{addr}/32"),
                "via",
                &fabric.to_string(),
            ],
        )
        .map(drop)
    }

    /// Two hops by plain routing (`on`), or back to the lab's one: `server` routes the origin's
    /// 203.0.113.0/24 via `peer`, which forwards (IP forwarding on, no ICMP redirects), and the
    /// origin routes `server`'s fabric address back via `peer`. The benchmark's honest baseline
    /// for forwarding: the same two hops without the dataplane.
    pub fn route_via(&self, server: &str, peer: &str, on: bool) -> anyhow::Result<()> {
        let fabric = |name: &str| {
            self.config
                .servers
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.fabric.to_string())
                .ok_or_else(|| anyhow!("no server {name} in the lab"))
        };
        let (mine, theirs) = (fabric(server)?, fabric(peer)?);
        let via = if on {
            theirs.clone()
        } else {
            ORIGIN_FABRIC_V4.to_string()
        };
        netns::ip_in(
            &self.server_ns(server),
            &["route", "replace", INTERNET_ROUTES[0], "via", &via],
        )?;
        let uplink = &self
            .config
            .servers
            .iter()
            .find(|s| s.name == peer)
            .map(|s| s.uplink.clone())
            .unwrap_or_default();
        let forward = if on { "1" } else { "0" };
        for setting in [
            format!("net.ipv4.ip_forward={forward}"),
            "net.ipv4.conf.all.send_redirects=0".to_string(),
            format!("net.ipv4.conf.{uplink}.send_redirects=0"),
        ] {
            self.run(&self.server_ns(peer), "sysctl", &["-qw", &setting])?;
        }
        let host = format!("{mine}/32");
        if on {
            netns::ip_in(
                &self.origin_ns(),
                &["route", "replace", &host, "via", &theirs],
            )?;
        } else {
            netns::ip_in(&self.origin_ns(), &["route", "del", &host])?;
        }
        Ok(())
    }

    /// Takes `server`'s fabric cable out (its bridge port down: the server loses carrier) or
    /// puts it back. Its addresses and routes stay.
    pub fn set_fabric_port(&self, server: &str, up: bool) -> anyhow::Result<()> {
        let id = self.server(server)?.id;
        netns::ip_in(
            &self.fabric_ns(),
            &[
                "link",
                "set",
                &format!("p-{id}"),
                if up { "up" } else { "down" },
            ],
        )
        .map(drop)
    }

    /// Stops the agent of `server` and removes its pinned links and maps, so its programs
    /// detach: the server is back to plain routing.
    pub fn remove_agent(&mut self, server: &str) -> anyhow::Result<()> {
        self.stop(&format!("agent-{server}"))?;
        crate::loader::detach(&self.pin_dir(server))?;
        Ok(())
    }

    /// Kills the agent of `server` with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill_agent(&mut self, server: &str) -> anyhow::Result<()> {
        let label = format!("agent-{server}");
        let i = self
            .procs
            .iter()
            .position(|p| p.label == label)
            .ok_or_else(|| anyhow!("no agent of {server} in the lab"))?;
        let mut p = self.procs.remove(i);
        p.child.kill()?;
        p.child.wait()?;
        Ok(())
    }

    /// Writes `config` as the lab's config and makes every running agent reload it (SIGHUP);
    /// waits until each has applied or rejected it and returns their log lines.
    pub fn reload(&mut self, config: &Config) -> anyhow::Result<Vec<String>> {
        let tmp = self.config_path().with_extension("tmp");
        std::fs::write(&tmp, toml::to_string(config)?)?;
        self.reload_written(&tmp)
    }

    /// Like [`Lab::reload`] with the config file's new content given as text (may be invalid).
    pub fn reload_text(&mut self, text: &str) -> anyhow::Result<Vec<String>> {
        let tmp = self.config_path().with_extension("tmp");
        std::fs::write(&tmp, text)?;
        self.reload_written(&tmp)
    }

    fn reload_written(&mut self, tmp: &Path) -> anyhow::Result<Vec<String>> {
        let agents: Vec<(String, u32)> = self
            .procs
            .iter()
            .filter(|p| p.label.starts_with("agent-"))
            .map(|p| (p.label.clone(), p.child.id()))
            .collect();
        let marks: Vec<usize> = agents.iter().map(|(l, _)| self.log_len(l)).collect();
        std::fs::rename(tmp, self.config_path())?;
        for (_, pid) in &agents {
            netns::kill(*pid as i32, libc::SIGHUP);
        }
        agents
            .iter()
            .zip(marks)
            .map(|((label, _), from)| {
                // The SIGHUP always answers; the file watcher may have answered first (it saw
                // the rename), and then its line is the one. Waiting for the SIGHUP's line too
                // leaves no late answer of this reload for the next one to take as its own.
                // Generous: a test may have filled a plan map (half a million entries) first.
                self.wait_for_log(label, from, &["reload (SIGHUP)"], Duration::from_secs(30))?;
                self.wait_for_log(
                    label,
                    from,
                    // Only this reload's lines: a liveness switch also logs "reload (liveness:
                    // ...)" and can land in the same second (CI saw it).
                    &["reload (SIGHUP)", "reload (config file changed)"],
                    Duration::from_secs(10),
                )
            })
            .collect()
    }

    /// Stops a process the lab started (SIGTERM, then SIGKILL after 3 s) and reaps it.
    pub fn stop(&mut self, label: &str) -> anyhow::Result<std::process::ExitStatus> {
        let i = self
            .procs
            .iter()
            .position(|p| p.label == label)
            .ok_or_else(|| anyhow!("no process {label} in the lab"))?;
        let mut p = self.procs.remove(i);
        Ok(terminate(&mut p.child))
    }

    /// Runs a program in `ns` to completion and returns its stdout (error on failure).
    pub fn run(&self, ns: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = netns::command_in(ns, program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} in {ns}"))?;
        netns::check(&format!("{program} {}", args.join(" ")), out)
    }

    /// `curl` from a server's namespace; returns the body.
    pub fn curl(&self, server: &str, url: &str) -> anyhow::Result<String> {
        self.run(
            &self.server_ns(server),
            "curl",
            &["-sS", "--max-time", "10", url],
        )
    }

    pub fn server_ns(&self, server: &str) -> String {
        format!("{}-s-{server}", self.prefix)
    }
    pub fn origin_ns(&self) -> String {
        format!("{}-origin", self.prefix)
    }
    pub fn fabric_ns(&self) -> String {
        format!("{}-fabric", self.prefix)
    }
    pub fn pin_dir(&self, server: &str) -> PathBuf {
        self.pin_root.join(server)
    }
    pub fn config_path(&self) -> PathBuf {
        self.work_dir.join("config.toml")
    }
    pub fn origin_log_path(&self) -> PathBuf {
        self.work_dir.join("origin-requests.log")
    }
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// Pids of the processes the lab started and still owns.
    /// The pid of a process the lab started.
    pub fn pid(&self, label: &str) -> Option<u32> {
        self.procs
            .iter()
            .find(|p| p.label == label)
            .map(|p| p.child.id())
    }

    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.child.id()).collect()
    }

    /// Leaves the lab running after this value is dropped (for `lab up`); returns its prefix.
    pub fn persist(mut self) -> String {
        self.keep = true;
        std::mem::take(&mut self.prefix)
    }
}

/// SIGTERM, up to 3 s grace, then SIGKILL; always reaps.
/// SIGTERM to every process, then SIGKILL to those still running after 3 s; all reaped.
fn terminate_all(mut procs: Vec<Proc>) {
    for p in &procs {
        debug!("stopping {} (pid {})", p.label, p.child.id());
        netns::kill(p.child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        procs.retain_mut(|p| !matches!(p.child.try_wait(), Ok(Some(_))));
        if procs.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for mut p in procs {
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    netns::kill(child.id() as i32, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().expect("reaping a child we started")
}

/// Adds the route `net via via` in `ns`, with the internet MTU on it when the fabric's is
/// larger.
fn add_route(ns: &str, net: &str, via: &str, fabric_mtu: u32) -> anyhow::Result<()> {
    let mtu = INTERNET_MTU.to_string();
    let mut args = vec!["route", "add", net, "via", via];
    if fabric_mtu > INTERNET_MTU {
        args.extend(["mtu", mtu.as_str()]);
    }
    netns::ip_in(ns, &args).map(drop)
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", p.display()))
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Everything but the etcd members first, all at once (agents revoke their leases while
        // etcd still answers), then the members.
        let (members, others): (Vec<Proc>, Vec<Proc>) = self
            .procs
            .drain(..)
            .partition(|p| p.label.starts_with("etcd-"));
        terminate_all(others);
        terminate_all(members);
        remove(&self.namespaces, &self.pin_root, &self.work_dir);
    }
}

/// Removes namespaces (killing what still runs inside them: only lab processes live there),
/// then the pin and work directories.
fn remove(namespaces: &[String], pin_root: &Path, work_dir: &Path) {
    for ns in namespaces.iter().rev() {
        for pid in netns::pids(ns) {
            netns::kill(pid, libc::SIGKILL);
        }
        if let Err(e) = netns::ip(&["netns", "del", ns]) {
            warn!("removing namespace {ns}: {e:#}");
        }
    }
    for dir in [pin_root, work_dir] {
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(dir)
        {
            warn!("removing {}: {e}", dir.display());
        }
    }
    if let Some(name) = pin_root.file_name() {
        remove_locks(&name.to_string_lossy());
    }
}

/// Removes the agents' lock files of a lab (their name holds `fragment`, the lab's prefix, or
/// names a network namespace) that no live agent holds.
fn remove_locks(fragment: &str) {
    let Ok(entries) = std::fs::read_dir(crate::loader::LOCK_DIR) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.contains(fragment) || name.starts_with("net")) {
            continue;
        }
        let Ok(f) = std::fs::File::open(e.path()) else {
            continue;
        };
        // SAFETY: flock on an fd owned here; taking it means no agent holds it.
        let free = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } == 0;
        if free {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// What leftover lab state exists: namespaces (with their pids), pin and work directories.
#[derive(Debug, Default, serde::Serialize)]
pub struct Leftovers {
    pub namespaces: Vec<(String, Vec<i32>)>,
    pub dirs: Vec<PathBuf>,
}

/// Finds everything any lab run left behind (prefix [`LAB_PREFIX`]).
pub fn leftovers() -> anyhow::Result<Leftovers> {
    let namespaces = netns::list(LAB_PREFIX)?
        .into_iter()
        .map(|ns| {
            let pids = netns::pids(&ns);
            (ns, pids)
        })
        .collect();
    let mut dirs = Vec::new();
    for root in [
        Path::new(DEFAULT_PIN_ROOT).to_path_buf(),
        std::env::temp_dir(),
    ] {
        if let Ok(entries) = std::fs::read_dir(&root) {
            dirs.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with(LAB_PREFIX))
                    .map(|e| e.path()),
            );
        }
    }
    Ok(Leftovers { namespaces, dirs })
}

/// Removes every leftover of crashed or persisted lab runs; returns what was removed.
pub fn down_leftovers() -> anyhow::Result<Leftovers> {
    let found = leftovers()?;
    let names: Vec<String> = found.namespaces.iter().map(|(n, _)| n.clone()).collect();
    remove(&names, Path::new(""), Path::new(""));
    for dir in &found.dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    remove_locks(LAB_PREFIX);
    Ok(found)
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefixes_are_unique_within_a_process_even_at_the_same_instant() {
        let all: std::collections::BTreeSet<String> =
            (0..1000).map(|_| super::unique_prefix()).collect();
        assert_eq!(all.len(), 1000);
        assert!(all.iter().all(|p| p.starts_with(super::LAB_PREFIX)));
    }
}
