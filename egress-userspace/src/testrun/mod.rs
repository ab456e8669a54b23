//! Running the real programs on crafted packets with BPF_PROG_TEST_RUN: the packet tests and
//! the per-packet benchmarks use this. Nothing is attached or pinned.

pub mod packet;
pub mod paths;

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{TestRun as _, TestRunOptions},
};
use egress_common::{
    fabric::Local,
    flow::FLOWS_CAPACITY,
    map_names, prog_names,
    stats::{Counter, Stat},
};

use crate::{
    loader::{self, LoadError, Maps},
    plan,
    validate::Topology,
};

/// Server `a` (10.50.0.11) holds acme (192.0.2.10 40000-40999, and the IPv6 prefix; `b` holds
/// 41000-42000) and beta (mark 42); gamma (203.0.113.128/25) is held by `b` (10.50.0.12, same
/// data center) only, so `a` forwards it there. `c` (10.50.0.13) is a peer holding nothing.
pub const FIXTURE_TOPOLOGY: &str = r#"
server = "a"
[[locations]]
name = "l1"
latitude = 50.0
longitude = 8.0
[[datacenters]]
name = "d1"
location = "l1"
[[servers]]
name = "a"
id = 11
datacenter = "d1"
fabric = "10.50.0.11"
uplink = "eth0"
[[servers]]
name = "b"
id = 12
datacenter = "d1"
fabric = "10.50.0.12"
uplink = "eth0"
[[servers]]
name = "c"
id = 13
datacenter = "d1"
fabric = "10.50.0.13"
uplink = "eth0"
[[pools]]
name = "acme"
id = 7
ipv6_prefix = "2001:db8:7::/64"
[[pools.ipv4]]
address = "192.0.2.10"
shares = [{ server = "a", ports = "40000-40999" }, { server = "b", ports = "41000-42000" }]
[[pools]]
name = "beta"
id = 8
[[pools.ipv4]]
address = "192.0.2.20"
shares = [{ server = "a", ports = "2000-2999" }]
[[pools]]
name = "gamma"
id = 9
[[pools.ipv4]]
address = "192.0.2.30"
shares = [{ server = "b", ports = "2000-2999" }]
[[policies]]
pool = "acme"
destinations = ["203.0.113.0/24", "2001:db8:beef::/48"]
[[policies]]
pool = "beta"
mark = 42
destinations = ["203.0.113.0/24"]
[[policies]]
pool = "gamma"
destinations = ["203.0.113.128/25"]
"#;

/// TC verdicts the programs return.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Egress,
    /// `tc_egress` on a packet carrying the ingress program's sent hint in its control block
    /// (what a peer's connection translated by `tc_ingress` carries on its second pass).
    EgressHinted,
    Ingress,
    /// The empty baseline program.
    Empty,
    /// A reference program of the benchmark (`egress_common::prog_names::REF_*`).
    Reference(&'static str),
    /// `xdp_ingress` (`egress agent --xdp`).
    Xdp,
    /// The empty XDP program.
    XdpEmpty,
}

/// `BPF_PROG_TEST_RUN` of the TC program `fd` with `BPF_F_TEST_SKB_CHECKSUM_COMPLETE`, which
/// aya's options cannot set: the kernel sums the packet into `skb->csum`, marks it
/// CHECKSUM_COMPLETE, and after the run fails with EBADMSG unless `skb->csum` still matches the
/// packet. Returns the verdict and the output's size.
fn test_run_checksum_complete(
    fd: i32,
    data_in: &[u8],
    data_out: &mut [u8],
    ctx_in: &[u8],
    ctx_out: &mut [u8],
) -> std::io::Result<(u32, u32)> {
    /// `union bpf_attr` as BPF_PROG_TEST_RUN reads it.
    #[repr(C)]
    #[derive(Default)]
    struct Attr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;
    let mut attr = Attr {
        prog_fd: fd as u32,
        data_size_in: data_in.len() as u32,
        data_size_out: data_out.len() as u32,
        data_in: data_in.as_ptr() as u64,
        data_out: data_out.as_mut_ptr() as u64,
        repeat: 1,
        ctx_size_in: ctx_in.len() as u32,
        ctx_size_out: ctx_out.len() as u32,
        ctx_in: ctx_in.as_ptr() as u64,
        ctx_out: ctx_out.as_mut_ptr() as u64,
        flags: BPF_F_TEST_SKB_CHECKSUM_COMPLETE,
        ..Default::default()
    };
    // SAFETY: the attribute points at buffers of the lengths it gives; all outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((attr.retval, attr.data_size_out))
}

/// XDP verdicts.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// The result of one run.
#[derive(Debug)]
pub struct Outcome {
    pub verdict: u32,
    pub packet: Vec<u8>,
    pub duration: std::time::Duration,
    /// XDP: the packet carries `XDP_DONE` in its metadata (finished in XDP, passed up).
    pub xdp_done: bool,
    /// TC: the sent hint's words of the packet's control block after the run.
    pub hint: Hint,
}

/// The two words of an skb's control block where the ingress program leaves its sent hint
/// (`__sk_buff.cb[SENT_HINT_CB]` and `cb[SENT_TAG_CB]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hint {
    pub word: u32,
    pub tag: u32,
}

impl Hint {
    pub const NONE: Hint = Hint { word: 0, tag: 0 };
    /// What the stack may leave in a local packet's control block: the hint word, and a tag of
    /// no packet.
    pub const LEFTOVER: Hint = Hint {
        word: egress_common::fabric::SENT_HINT,
        tag: 0,
    };
}

/// The programs loaded with their own (unpinned) maps holding one server's plan.
pub struct TestDatapath {
    ebpf: Ebpf,
    pub maps: Maps,
    trace: Option<(aya_log::EbpfLogger<Trace>, Trace)>,
    /// `tc_ingress` runs hand the program a CHECKSUM_COMPLETE skb (as a NIC that sums every
    /// packet it receives gives) and fail when it leaves `skb->csum` wrong for the packet it
    /// returns (`BPF_F_TEST_SKB_CHECKSUM_COMPLETE`, kernels from 6.11). Egress runs are left
    /// alone: what leaves a host is not checked against `skb->csum`.
    pub checksum_complete: bool,
    /// The key of the sent hint's tag the programs were loaded with.
    sent_key: u32,
}

/// The decision log of a traced datapath, as text lines.
#[derive(Clone, Default)]
pub struct Trace(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Trace {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let line = loader::trace_line(&record.args().to_string());
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }

    fn flush(&self) {}
}

impl TestDatapath {
    /// Loads the programs and writes `server`'s plan of `topology` into the maps, with `local`
    /// as this server's fabric settings.
    pub fn new(topology: &Topology, server: &str, local: &Local) -> anyhow::Result<Self> {
        Self::with_flow_capacity(topology, server, local, FLOWS_CAPACITY)
    }

    /// Like [`TestDatapath::new`] with a flow table of `flow_capacity` entries.
    pub fn with_flow_capacity(
        topology: &Topology,
        server: &str,
        local: &Local,
        flow_capacity: u32,
    ) -> anyhow::Result<Self> {
        Self::build(topology, server, local, (flow_capacity, 1), 0)
    }

    /// `capacities`: the flow table's and the reference claim table's entries;
    /// `trace_every`: one decision in this many logged (0: none).
    fn build(
        topology: &Topology,
        server: &str,
        local: &Local,
        (flow_capacity, reference_capacity): (u32, u32),
        trace_every: u32,
    ) -> anyhow::Result<Self> {
        let sent_key = loader::sent_key();
        let mut ebpf =
            loader::load_unpinned(flow_capacity, reference_capacity, trace_every, sent_key)?;
        let trace = if trace_every == 0 {
            None
        } else {
            let lines = Trace::default();
            let logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, lines.clone())?;
            Some((logger, lines))
        };
        for (name, _) in loader::PROGRAMS {
            loader::program(&mut ebpf, name)?;
        }
        loader::program(&mut ebpf, prog_names::TC_EMPTY)?;
        loader::xdp_program(&mut ebpf, prog_names::XDP_INGRESS)?;
        loader::xdp_program(&mut ebpf, prog_names::XDP_EMPTY)?;
        loader::fill_jump_table(&mut ebpf)?;
        if trace_every != 0 {
            loader::enable_trace(&mut ebpf)?;
        }
        let mut maps = loader::take_maps(&mut ebpf)?;
        maps.set_local(local)?;
        let p = plan::plan(topology, server);
        maps.plan.apply(&plan::map_contents(topology, &p))?;
        // As the agent's first collection would leave it: the plan's buckets, nothing else.
        maps.refine_filter()?;
        Ok(Self {
            ebpf,
            maps,
            trace,
            checksum_complete: false,
            sent_key,
        })
    }

    /// [`TestDatapath::fixture`] with the programs' decision log on (`trace_every`: one in
    /// this many; see `egress agent --trace`), read with [`TestDatapath::trace_lines`].
    pub fn fixture_traced(net: &TestNet, topology: &str, trace_every: u32) -> anyhow::Result<Self> {
        Self::fixture_sized(net, topology, (FLOWS_CAPACITY, FLOWS_CAPACITY), trace_every)
    }

    /// Bytes of program `name` as the verifier left it (dead code removed).
    pub fn translated_size(&mut self, name: &'static str) -> anyhow::Result<u32> {
        let prog = loader::program(&mut self.ebpf, name)?;
        Ok(prog.info()?.size_translated().unwrap_or(0))
    }

    /// The decision log lines written since the last call (traced datapaths only).
    pub fn trace_lines(&mut self) -> Vec<String> {
        let Some((logger, lines)) = self.trace.as_mut() else {
            return Vec::new();
        };
        logger.flush();
        std::mem::take(&mut *lines.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The datapath of server `a` of `topology` (TOML; usually [`FIXTURE_TOPOLOGY`]),
    /// encapsulating out of `net`'s uplink (fabric 10.50.0.11, tunnel MSS 1432).
    pub fn fixture(net: &TestNet, topology: &str) -> anyhow::Result<Self> {
        Self::fixture_with_flow_capacity(net, topology, FLOWS_CAPACITY)
    }

    /// [`TestDatapath::fixture`] with a flow table of `flow_capacity` entries.
    pub fn fixture_with_flow_capacity(
        net: &TestNet,
        topology: &str,
        flow_capacity: u32,
    ) -> anyhow::Result<Self> {
        Self::fixture_sized(net, topology, (flow_capacity, 1), 0)
    }

    /// [`TestDatapath::fixture`] for the benchmark: the reference claim program's table as
    /// large as the flow table (the same work per insert).
    pub fn fixture_with_references(net: &TestNet, topology: &str) -> anyhow::Result<Self> {
        Self::fixture_sized(net, topology, (FLOWS_CAPACITY, FLOWS_CAPACITY), 0)
    }

    fn fixture_sized(
        net: &TestNet,
        topology: &str,
        capacities: (u32, u32),
        trace_every: u32,
    ) -> anyhow::Result<Self> {
        let t = crate::validate::validate(&crate::config::Config::parse(topology, "fixture")?)?;
        let local = Local {
            fabric: [10, 50, 0, 11],
            ifindex: net.ifindex,
            mss_v4: 1432,
            fenced: 0,
            _pad: 0,
            peer_budget: egress_common::fabric::PEER_BUDGET,
        };
        Self::build(&t, "a", &local, capacities, trace_every)
    }

    /// Runs `packet` through the program of `hook` once, with skb mark `mark` (TC hooks).
    pub fn run(&mut self, hook: Hook, mark: u32, packet: &[u8]) -> anyhow::Result<Outcome> {
        let hint = match hook {
            Hook::EgressHinted => self.hint_for(packet),
            _ => Hint::NONE,
        };
        self.run_hinted(hook, mark, hint, packet)
    }

    /// [`Self::run`] with `hint` in the skb's control block (TC hooks): what the ingress
    /// program leaves on what it sends out, or what the stack left there.
    pub fn run_hinted(
        &mut self,
        hook: Hook,
        mark: u32,
        hint: Hint,
        packet: &[u8],
    ) -> anyhow::Result<Outcome> {
        self.run_skb(hook, mark, hint, 0, packet)
    }

    /// The sent hint the ingress program leaves on `packet` (an IPv4 frame) when it sends it
    /// out: the hint word and the tag of its tuple under this load's key
    /// (`egress_common::fabric::sent_tag`). Tag 0 for a frame with no IPv4 tuple.
    pub fn hint_for(&self, packet: &[u8]) -> Hint {
        Hint {
            word: egress_common::fabric::SENT_HINT,
            tag: tag_of(self.sent_key, packet).unwrap_or(0),
        }
    }

    /// Whether `hint` is the ingress program's own on `packet` (see [`Self::hint_for`]).
    pub fn hint_is_genuine(&self, hint: Hint, packet: &[u8]) -> bool {
        tag_of(self.sent_key, packet).is_some() && hint == self.hint_for(packet)
    }

    /// [`Self::run`] of a GSO packet: the skb says its segments carry `gso_size` bytes each
    /// (as a socket with UDP_SEGMENT or TSO hands it down).
    pub fn run_gso(&mut self, hook: Hook, gso_size: u32, packet: &[u8]) -> anyhow::Result<Outcome> {
        self.run_skb(hook, 0, Hint::NONE, gso_size, packet)
    }

    fn run_skb(
        &mut self,
        hook: Hook,
        mark: u32,
        hint: Hint,
        gso_size: u32,
        packet: &[u8],
    ) -> anyhow::Result<Outcome> {
        let name = match hook {
            Hook::Egress | Hook::EgressHinted => prog_names::TC_EGRESS,
            Hook::Ingress => prog_names::TC_INGRESS,
            Hook::Empty => prog_names::TC_EMPTY,
            Hook::Reference(name) => name,
            Hook::Xdp => return self.run_xdp(prog_names::XDP_INGRESS, packet),
            Hook::XdpEmpty => return self.run_xdp(prog_names::XDP_EMPTY, packet),
        };
        let prog = loader::program(&mut self.ebpf, name)?;
        // A prefix of struct __sk_buff up to gso_size: len, pkt_type, mark at 8, ..., cb[0..5]
        // at 48, ..., gso_size at 176 (the kernel takes mark, cb and gso_size from here, and
        // wants the rest zero).
        const CB: usize = 48;
        const GSO_SIZE: usize = 176;
        let hint_at = CB + 4 * egress_common::fabric::SENT_HINT_CB;
        let tag_at = CB + 4 * egress_common::fabric::SENT_TAG_CB;
        let mut ctx = [0u8; GSO_SIZE + 4];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        ctx[hint_at..hint_at + 4].copy_from_slice(&hint.word.to_ne_bytes());
        ctx[tag_at..tag_at + 4].copy_from_slice(&hint.tag.to_ne_bytes());
        ctx[GSO_SIZE..].copy_from_slice(&gso_size.to_ne_bytes());
        // The kernel writes all of struct __sk_buff back (ENOSPC if it does not fit).
        let mut ctx_out = [0u8; 256];
        let mut out = vec![0u8; packet.len() + 512];
        let (verdict, size_out, duration) = if self.checksum_complete && hook == Hook::Ingress {
            use std::os::fd::{AsFd as _, AsRawFd as _};
            let fd = prog
                .fd()
                .map_err(|source| LoadError::Program { name, source })?
                .as_fd()
                .as_raw_fd();
            let (verdict, size_out) =
                test_run_checksum_complete(fd, packet, &mut out, &ctx, &mut ctx_out).map_err(
                    |e| {
                        anyhow::anyhow!(
                            "{name} on a CHECKSUM_COMPLETE skb: {e}{}",
                            if e.raw_os_error() == Some(libc::EBADMSG) {
                                " (skb->csum left wrong for the packet returned)"
                            } else {
                                ""
                            }
                        )
                    },
                )?;
            (verdict, size_out, std::time::Duration::ZERO)
        } else {
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(packet),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ctx_out: Some(&mut ctx_out),
                    ..TestRunOptions::default()
                })
                .map_err(|source| LoadError::Program { name, source })?;
            (r.return_value, r.data_size_out, r.duration)
        };
        out.truncate(size_out as usize);
        let word = |at: usize| u32::from_ne_bytes(ctx_out[at..at + 4].try_into().expect("4 bytes"));
        let hint = Hint {
            word: word(hint_at),
            tag: word(tag_at),
        };
        Ok(Outcome {
            verdict,
            packet: out,
            duration,
            xdp_done: false,
            hint,
        })
    }

    /// Runs XDP program `name` once. The output the kernel gives starts with the metadata
    /// (as long as the returned `xdp_md.data` says): taken off, and read for `XDP_DONE`.
    fn run_xdp(&mut self, name: &'static str, packet: &[u8]) -> anyhow::Result<Outcome> {
        let prog = loader::xdp_program(&mut self.ebpf, name)?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex (u32 each); the frame from 0 to its length, no metadata.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
        let mut ctx_out = [0u8; 24];
        let mut out = vec![0u8; packet.len() + 512];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::default()
            })
            .map_err(|source| LoadError::Program { name, source })?;
        out.truncate(r.data_size_out as usize);
        let meta = u32::from_ne_bytes(ctx_out[0..4].try_into().expect("4 bytes")) as usize;
        let xdp_done = meta == 4
            && out.len() >= 4
            && u32::from_ne_bytes(out[0..4].try_into().expect("4 bytes"))
                == egress_common::fabric::XDP_DONE;
        out.drain(..meta.min(out.len()));
        Ok(Outcome {
            verdict: r.return_value,
            packet: out,
            duration: r.duration,
            xdp_done,
            hint: Hint::NONE,
        })
    }

    /// Counter `stat` summed over CPUs (packets).
    pub fn counter(&self, stat: Stat) -> u64 {
        let map = self.ebpf.map(map_names::STATS).expect("STATS map");
        let arr: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(map).expect("STATS is a per-CPU array");
        crate::stats::total(&arr, stat).map_or(0, |c| c.packets)
    }
}

/// The sent hint's tag of an IPv4 frame (no VLAN tag) under `key`: of its tuple as
/// `tc_egress` parses it — addresses, ports in network order (an echo request: its identifier
/// and 0), protocol — for TCP, UDP or an ICMP echo request whose header lies within the IP
/// length. None for anything else: such a packet has no tuple, so no tag.
fn tag_of(key: u32, p: &[u8]) -> Option<u32> {
    if p.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ihl = usize::from(p.get(14)? & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes(p.get(16..18)?.try_into().ok()?));
    let src: [u8; 4] = p.get(26..30)?.try_into().ok()?;
    let dst: [u8; 4] = p.get(30..34)?.try_into().ok()?;
    let proto = *p.get(23)?;
    let l4 = 14 + ihl;
    let header = match proto {
        6 => 20,
        17 | 1 => 8,
        _ => return None,
    };
    if ihl < 20 || ihl + header > total || p.len() < l4 + header {
        return None;
    }
    let be = |at: usize| u16::from_ne_bytes([p[at], p[at + 1]]);
    let (sport, dport) = match proto {
        1 if p[l4] == 8 => (be(l4 + 4), 0),
        1 => return None,
        _ => (be(l4), be(l4 + 2)),
    };
    Some(egress_common::fabric::sent_tag(
        key, src, dst, sport, dport, proto,
    ))
}

/// A network namespace for packet tests: an uplink `up0` (10.50.0.11/16, forwarding on) with
/// permanent neighbours for the peer 10.50.0.12 and the gateway 10.50.255.254 (the route to
/// 203.0.113.0/24), so FIB lookups in BPF_PROG_TEST_RUN are deterministic. The calling thread
/// enters it; dropping it removes it.
pub struct TestNet {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xff, 0xfe];

impl TestNet {
    /// Creates the namespace and moves the calling thread into it. Panics on failure (a test
    /// or benchmark fixture).
    pub fn enter() -> TestNet {
        use crate::lab::netns::{ip, ip_in};
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{}{:x}t{n}-pkt", crate::lab::LAB_PREFIX, std::process::id());
        ip(&["netns", "add", &name]).unwrap();
        // From here on, a panic removes the namespace.
        let mut net = TestNet {
            name: name.clone(),
            ifindex: 0,
            mac: [0; 6],
        };
        for args in [
            &["link", "add", "up0", "type", "veth", "peer", "name", "up1"][..],
            &["link", "set", "up0", "up"],
            &["link", "set", "up1", "up"],
            &["addr", "add", "10.50.0.11/16", "dev", "up0"],
            &["route", "add", "203.0.113.0/24", "via", "10.50.255.254"],
            &[
                "neigh",
                "add",
                "10.50.0.12",
                "lladdr",
                "02:00:00:00:00:12",
                "dev",
                "up0",
                "nud",
                "permanent",
            ],
            &[
                "neigh",
                "add",
                "10.50.255.254",
                "lladdr",
                "02:00:00:00:ff:fe",
                "dev",
                "up0",
                "nud",
                "permanent",
            ],
        ] {
            ip_in(&name, args).unwrap();
        }
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &name,
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.forwarding=1",
                "net.ipv4.conf.up0.forwarding=1",
            ])
            .status()
            .unwrap();
        assert!(out.success(), "sysctl forwarding");
        let link: serde_json::Value =
            serde_json::from_str(&ip_in(&name, &["-j", "link", "show", "up0"]).unwrap()).unwrap();
        let mac: Vec<u8> = link[0]["address"]
            .as_str()
            .unwrap()
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        net.ifindex = link[0]["ifindex"].as_u64().unwrap() as u32;
        net.mac = mac.try_into().unwrap();
        // Enter it with this thread only (setns affects the calling thread).
        let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        // SAFETY: a valid namespace fd; affects only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        net
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = crate::lab::netns::ip(&["netns", "del", &self.name]);
    }
}
