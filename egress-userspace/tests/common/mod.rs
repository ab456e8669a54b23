//! Shared helpers of the privileged tests.
#![allow(dead_code, reason = "each test file uses a different subset")]

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

/// The source the origin must see: an address and a port range.
#[derive(Debug, Clone, Copy)]
pub struct WantSrc {
    pub addr: &'static str,
    pub ports: (u16, u16),
}

impl WantSrc {
    pub fn check(&self, what: &str, (src, port): &(String, u16)) {
        assert_eq!(src, self.addr, "{what}: source address seen by the origin");
        assert!(
            (self.ports.0..=self.ports.1).contains(port),
            "{what}: source port {port} outside {}-{}",
            self.ports.0,
            self.ports.1
        );
    }
}

fn url(host: std::net::IpAddr, path: &str) -> String {
    match host {
        std::net::IpAddr::V4(a) => format!("http://{a}{path}"),
        std::net::IpAddr::V6(a) => format!("http://[{a}]{path}"),
    }
}

/// `n` connections held open together (the origin delays each answer by 1 s): all succeed, each
/// from the expected source, with `n` distinct ports.
pub fn check_concurrent(lab: &Lab, server: &str, host: std::net::IpAddr, n: usize, want: WantSrc) {
    let u = url(host, "/delay/1000");
    let mut args = vec![
        "-sS",
        "--max-time",
        "30",
        "--parallel",
        "--parallel-immediate",
        "--parallel-max",
        "250",
    ];
    args.extend(std::iter::repeat_n(u.as_str(), n));
    let out = lab
        .run(&lab.server_ns(server), "curl", &args)
        .expect("every transfer succeeds");
    // The bodies arrive back to back: read them as a stream of JSON values.
    let answers: Vec<(String, u16)> = serde_json::Deserializer::from_str(&out)
        .into_iter::<serde_json::Value>()
        .map(|v| seen(&v.unwrap().to_string()))
        .collect();
    assert_eq!(answers.len(), n, "{server}: {n} answers");
    let ports: std::collections::BTreeSet<u16> = answers.iter().map(|(_, p)| *p).collect();
    assert_eq!(ports.len(), n, "{server}: {n} distinct source ports");
    for a in &answers {
        want.check(server, a);
    }
}

/// Downloads `size` bytes from the origin and checks them against the generator's SHA-256;
/// the origin's log must show the download from the expected source.
pub fn check_download(lab: &Lab, server: &str, host: std::net::IpAddr, size: u64, want: WantSrc) {
    let file = lab.work_dir().join(format!("download-{server}-{host}.bin"));
    lab.run(
        &lab.server_ns(server),
        "curl",
        &[
            "-sS",
            "--max-time",
            "60",
            "-o",
            file.to_str().unwrap(),
            &url(host, &format!("/bytes/{size}")),
        ],
    )
    .unwrap_or_else(|e| panic!("{server}: download of {size} bytes: {e:#}"));
    let data = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    assert_eq!(data.len() as u64, size, "{server}: size");
    use sha2::Digest as _;
    let got = egress::fleet::hex(&sha2::Sha256::digest(&data));
    assert_eq!(
        got,
        egress::lab::origin::payload_sha256(size),
        "{server}: content hash"
    );
    let log = std::fs::read_to_string(lab.origin_log_path()).unwrap();
    let line = log
        .lines()
        .rev()
        .find(|l| l.ends_with(&format!("/bytes/{size}")))
        .expect("origin logged the download");
    let mut f = line.split_whitespace().skip(1);
    let seen_src = (
        f.next().unwrap().to_string(),
        f.next().unwrap().parse().unwrap(),
    );
    want.check(&format!("{server} download"), &seen_src);
}

/// Uploads `size` bytes of the payload generator's content to `host`'s `/upload` and checks
/// that every byte arrived intact, from `want`.
pub fn check_upload(lab: &Lab, server: &str, host: std::net::IpAddr, size: u64, want: WantSrc) {
    let file = lab.work_dir().join(format!("upload-{size}.bin"));
    if !file.exists() {
        let data: Vec<u8> = (0..size).map(egress::lab::origin::payload_byte).collect();
        std::fs::write(&file, data).unwrap();
    }
    let body = lab
        .run(
            &lab.server_ns(server),
            "curl",
            &[
                "-sS",
                "--max-time",
                "60",
                "--data-binary",
                &format!("@{}", file.display()),
                &url(host, "/upload"),
            ],
        )
        .unwrap_or_else(|e| panic!("{server}: upload of {size} bytes: {e:#}"));
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
    want.check(
        &format!("{server} upload"),
        &(
            v["src"].as_str().unwrap().to_string(),
            v["port"].as_u64().unwrap() as u16,
        ),
    );
    assert_eq!(v["bytes"], size, "{server}: every byte arrived");
    assert_eq!(
        v["sha256"].as_str().unwrap(),
        egress::lab::origin::payload_sha256(size),
        "{server}: upload content"
    );
}

/// One request; the origin's answer.
pub fn check_curl(lab: &Lab, server: &str, host: std::net::IpAddr, want: WantSrc) {
    let body = lab
        .curl(server, &url(host, "/"))
        .unwrap_or_else(|e| panic!("{server}: {e:#}"));
    want.check(server, &seen(&body));
}

/// A download running in the background in a server's namespace (curl, rate-limited so it
/// spans the test's events). Killed on drop if not finished.
pub struct Transfer {
    pub server: String,
    child: Option<std::process::Child>,
    file: std::path::PathBuf,
    size: u64,
}

impl Transfer {
    pub fn start(
        lab: &Lab,
        server: &str,
        host: std::net::Ipv4Addr,
        size: u64,
        rate: &str,
        n: usize,
    ) -> Transfer {
        let file = lab.work_dir().join(format!("transfer-{server}-{n}.bin"));
        let child = egress::lab::netns::command_in(&lab.server_ns(server), "curl")
            .args(["-sS", "--max-time", "120", "--limit-rate", rate, "-o"])
            .arg(&file)
            .arg(format!("http://{host}/bytes/{size}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("curl starts");
        Transfer {
            server: server.to_string(),
            child: Some(child),
            file,
            size,
        }
    }

    /// Waits for the transfer and checks it completed with every byte intact.
    pub fn finish(mut self) {
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}: transfer failed ({}): {}",
            self.server,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let data = std::fs::read(&self.file).unwrap();
        assert_eq!(
            data.len() as u64,
            self.size,
            "{}: transfer size",
            self.server
        );
        use sha2::Digest as _;
        let got = egress::fleet::hex(&sha2::Sha256::digest(&data));
        assert_eq!(
            got,
            egress::lab::origin::payload_sha256(self.size),
            "{}: transfer content",
            self.server
        );
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// The agent's metrics page on `server` (Prometheus text).
pub fn metrics(lab: &Lab, server: &str) -> String {
    lab.run(
        &lab.server_ns(server),
        "curl",
        &["-sS", "--max-time", "10", "http://127.0.0.1:9464/metrics"],
    )
    .unwrap()
}

/// Datapath counter `name` (packets) of a server, from its pinned maps.
pub fn counter(lab: &Lab, server: &str, name: &str) -> u64 {
    egress::stats::read(&lab.pin_dir(server))
        .unwrap()
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no counter {name}"))
        .packets
}

/// The five servers of the default lab.
pub const SERVERS: [&str; 5] = ["fra-a-1", "fra-a-2", "fra-b-1", "ams-a-1", "sin-a-1"];
pub const VIA_FRA_A_1: WantSrc = WantSrc {
    addr: "192.0.2.10",
    ports: (1024, 32767),
};
/// In config B, fra-a-2 holds 40000-49999 of 192.0.2.10 (carved out of ams-a-1's range).
pub const FRA_A_2_IN_B: WantSrc = WantSrc {
    addr: "192.0.2.10",
    ports: (40000, 49999),
};

/// The default config with a port range moved: ams-a-1 gives 40000-49999 to fra-a-2, so
/// fra-a-2 translates locally and fra-b-1 and sin-a-1 get a second next hop.
pub fn config_b() -> Config {
    let text = egress::config::DEFAULT_CONFIG.replace(
        r#"{ server = "ams-a-1", ports = "32768-65535" },"#,
        r#"{ server = "ams-a-1", ports = "32768-39999" },
  { server = "fra-a-2", ports = "40000-49999" },
  { server = "ams-a-1", ports = "50000-65535" },"#,
    );
    let c = egress::config::Config::parse(&text, "config B").unwrap();
    egress::validate::validate(&c).expect("config B is valid");
    c
}

/// Starts the long-lived load: a 200 MB download on tier 1 (fra-a-1) and 50 slower ones over
/// tiers 1 (fra-a-1), 2 (fra-a-2) and 4 (sin-a-1).
pub fn load(lab: &egress::lab::Lab) -> Vec<Transfer> {
    let mut t = vec![Transfer::start(
        lab,
        "fra-a-1",
        egress::lab::ORIGIN_V4,
        200 << 20,
        "16M",
        0,
    )];
    for i in 0..50 {
        let from = ["fra-a-1", "fra-a-2", "sin-a-1"][i % 3];
        t.push(Transfer::start(
            lab,
            from,
            egress::lab::ORIGIN_V4,
            3 << 20,
            "256K",
            i + 1,
        ));
    }
    t
}
