//! Shared helpers of the privileged tests.
#![allow(dead_code, reason = "each test file uses a different subset")]

pub mod packet;

use egress::{
    config::Config,
    lab::{Lab, LabSpec},
};

pub const EGRESS: &str = env!("CARGO_BIN_EXE_egress");

/// These tests load BPF programs and build namespaces: they need root, and say so plainly.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "end-to-end tests need root (run `cargo xtask test` as root)"
    );
}

pub fn lab(config: Config) -> Lab {
    require_root();
    Lab::up(LabSpec::new(config, EGRESS)).expect("lab builds")
}

/// The origin's answer: the source address and port it saw.
pub fn seen(body: &str) -> (String, u16) {
    let v: serde_json::Value =
        serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("origin answer {body:?}: {e}"));
    (
        v["src"].as_str().expect("src").to_string(),
        v["port"].as_u64().expect("port") as u16,
    )
}

/// A lab of the embedded default config with the agent running on `servers`.
pub fn lab_with_agents(servers: &[&str]) -> Lab {
    let mut lab = lab(Config::embedded());
    for s in servers {
        lab.start_agent(s).expect("agent starts");
    }
    lab
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
    pub fn enter() -> TestNet {
        use egress::lab::netns::{ip, ip_in};
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!(
            "{}{:x}t{n}-pkt",
            egress::lab::LAB_PREFIX,
            std::process::id()
        );
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
        let _ = egress::lab::netns::ip(&["netns", "del", &self.name]);
    }
}
