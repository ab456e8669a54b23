//! End to end, liveness and failover: the lab in fleet mode (etcd leases) with fabric probes;
//! holders die (agent SIGKILLed and cable out), lose only their fabric, or only their lease,
//! while clients on other servers open a new connection every 50 ms. Each new connection takes
//! the first tier that is possible, within 3 s of the fault.

mod common;

use std::time::{Duration, Instant};

use common::{SERVERS, VIA_FRA_A_1, WantSrc};
use egress::{
    config::{Config, DEFAULT_CONFIG},
    lab::{
        self, Lab,
        attempts::{self, Attempt, Attempts, now_ms},
    },
};

/// acme's other share: ams-a-1's range of 192.0.2.10.
const VIA_AMS_A_1: WantSrc = WantSrc {
    addr: "192.0.2.10",
    ports: (32768, 65535),
};
/// What the tests give as hold-down (the default is 5 s).
const HOLD_DOWN: &str = "2";

fn fleet_lab() -> Lab {
    let mut lab = common::lab(Config::embedded());
    lab.start_fleet(true).expect("etcd cluster starts");
    lab.publish(DEFAULT_CONFIG).expect("first publish");
    for s in SERVERS {
        lab.start_fleet_agent(s, &["--hold-down", HOLD_DOWN])
            .unwrap_or_else(|e| panic!("fleet agent {s}: {e:#}"));
    }
    lab
}

/// Attempts every 50 ms, each bounded to 1 s.
struct Client(Attempts);

impl Client {
    fn start(lab: &Lab, server: &str, dst: std::net::Ipv4Addr, count: u32) -> Client {
        Client(Attempts::start(lab, server, dst, count, Duration::from_secs(1)).unwrap())
    }
    fn finish(self) -> Vec<Attempt> {
        self.0.finish().unwrap()
    }
}

fn failed_over(what: &str, attempts: &[Attempt], fault: u128, want: WantSrc) -> Duration {
    let (took, after) = attempts::failed_over(attempts, fault, want.addr, want.ports)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        after.is_empty(),
        "{what}: failures after the first success: {after:?}"
    );
    took
}

/// `server`'s metrics page.
fn metrics(lab: &Lab, server: &str) -> String {
    lab.run(
        &lab.server_ns(server),
        "curl",
        &["-sS", "--max-time", "5", "http://127.0.0.1:9464/metrics"],
    )
    .unwrap()
}

fn metric(lab: &Lab, server: &str, name: &str) -> String {
    metrics(lab, server)
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .to_string()
}

/// The default topology without beta (ams-a-1's pool of its own).
fn without_beta() -> String {
    let pool = DEFAULT_CONFIG
        .find("# Held only in ams")
        .expect("beta's pool in the default config");
    let policy = DEFAULT_CONFIG
        .find("[[policies]]\npool = \"beta\"")
        .expect("beta's policy in the default config");
    let first_policy = DEFAULT_CONFIG.find("[[policies]]").unwrap();
    format!(
        "{}{}{}",
        &DEFAULT_CONFIG[..pool],
        &DEFAULT_CONFIG[first_policy..policy],
        DEFAULT_CONFIG[policy..]
            .split_once("\n\n")
            .map_or("", |(_, rest)| rest)
    )
}

/// Waits until `server`'s agent has applied revision `rev`.
fn wait_applied(lab: &Lab, server: &str, rev: i64) {
    let t = Instant::now();
    while !metric(lab, server, "egress_applied_revision").ends_with(&format!(" {rev}")) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{server} applies revision {rev}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `server`'s prober watches `peer` (its transitions are exported for the watched ones).
fn watched(lab: &Lab, server: &str, peer: &str) -> bool {
    metrics(lab, server).lines().any(|l| {
        l.starts_with("egress_peer_transitions") && l.contains(&format!("server=\"{peer}\""))
    })
}

/// Waits up to `secs` for `server`'s metric `name` to read 1.
fn wait_metric(lab: &Lab, server: &str, name: &str, secs: u64) {
    let t = Instant::now();
    while !metric(lab, server, name).ends_with(" 1") {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{name} 1 on {server} within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `egress explain --live` of acme's destination on `server`: which next hops are skipped, why.
fn explain_live(lab: &Lab, server: &str) -> String {
    let pins = lab.pin_dir(server);
    lab.run(
        &lab.server_ns(server),
        common::EGRESS,
        &[
            "explain",
            "--config",
            lab.config_path().to_str().unwrap(),
            "--server",
            server,
            "--dst",
            &lab::ORIGIN_V4_CHECK.to_string(),
            "--live",
            "--pin-dir",
            pins.to_str().unwrap(),
        ],
    )
    .unwrap()
}

/// Waits until `server` sends new connections to acme's destination from `want` again.
fn back_to(lab: &Lab, server: &str, want: WantSrc, within: Duration) -> Duration {
    attempts::wait_for_source(
        lab,
        server,
        lab::ORIGIN_V4_CHECK,
        want.addr,
        want.ports,
        within,
    )
    .unwrap()
}

#[test]
fn dead_holders_are_skipped_within_3_s_at_every_tier_and_come_back_after_the_hold_down() {
    let mut lab = fleet_lab();
    common::check_curl(&lab, "fra-a-2", lab::ORIGIN_V4_CHECK.into(), VIA_FRA_A_1);
    common::check_curl(&lab, "fra-b-1", lab::ORIGIN_V4_CHECK.into(), VIA_FRA_A_1);

    // 1. fra-a-1 dies (agent SIGKILLed, cable out). fra-a-2 (same data center) and fra-b-1
    //    (same location) go to the nearest location, ams-a-1; a transfer through ams-a-1
    //    (beta, from sin-a-1) carries on.
    let transfer = common::Transfer::start(&lab, "sin-a-1", lab::ORIGIN_V4_HIGH, 24 << 20, "4M", 0);
    let a = Client::start(&lab, "fra-a-2", lab::ORIGIN_V4_CHECK, 100);
    let b = Client::start(&lab, "fra-b-1", lab::ORIGIN_V4_CHECK, 100);
    // A download through fra-a-1 when it dies: it cannot be saved, but must not hang.
    let mut doomed = lab::netns::command_in(&lab.server_ns("fra-a-2"), "curl")
        .args(["-sS", "--max-time", "60", "-o", "/dev/null"])
        // Paced by the origin: nothing received waits in curl's buffers when fra-a-1 dies
        // (a client-side rate limit leaves megabytes there to read before the error).
        .arg(format!(
            "http://{}/trickle/{}",
            lab::ORIGIN_V4,
            100u64 << 20
        ))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let fault = now_ms();
    let t_fault = Instant::now();
    lab.kill_agent("fra-a-1").unwrap();
    lab.set_fabric_port("fra-a-1", false).unwrap();
    let ended = loop {
        if let Some(status) = doomed.try_wait().unwrap() {
            break (t_fault.elapsed(), status);
        }
        assert!(
            t_fault.elapsed() < Duration::from_secs(10),
            "the download through the dead peer hangs"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut why = String::new();
    std::io::Read::read_to_string(&mut doomed.stderr.take().unwrap(), &mut why).unwrap();
    eprintln!(
        "download through the dead peer ended after {:?}: {}",
        ended.0,
        why.trim()
    );
    assert!(!ended.1.success());
    assert!(why.contains("abort"), "{why}");
    assert!(ended.0 < Duration::from_secs(3), "{:?}", ended.0);
    let same_dc = failed_over(
        "same data center → nearest location",
        &a.finish(),
        fault,
        VIA_AMS_A_1,
    );
    let same_loc = failed_over(
        "same location → nearest location",
        &b.finish(),
        fault,
        VIA_AMS_A_1,
    );
    eprintln!("failover: same-dc {same_dc:?}, same-location {same_loc:?}");
    assert!(same_dc < Duration::from_secs(3), "{same_dc:?}");
    assert!(same_loc < Duration::from_secs(3), "{same_loc:?}");
    transfer.finish();
    assert!(metric(&lab, "fra-a-2", "egress_peer_up{server=\"fra-a-1\"").ends_with(" 0"));
    // Seen from the maps and from the fleet: which next hop is skipped, and why.
    let explained = explain_live(&lab, "fra-a-2");
    assert!(
        explained.contains("skipped (down): fra-a-1 (10.50.0.11): fabric probes unanswered"),
        "{explained}"
    );
    let status = lab
        .fleet_cmd(egress::fleet::pki::READER_USER, &["status"])
        .unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("fra-a-2") && l.contains("sees down: fra-a-1")),
        "{status}"
    );

    // Back: cable in, agent restarted; new connections return to fra-a-1 after the hold-down
    // (not before).
    lab.set_fabric_port("fra-a-1", true).unwrap();
    // Counted from the new agent's start: its lease (which the peers wait for) cannot come
    // before it, whatever its start costs (program loading takes a few hundred ms).
    let t0 = std::time::Instant::now();
    lab.start_fleet_agent("fra-a-1", &["--hold-down", HOLD_DOWN])
        .unwrap();
    let started = t0.elapsed();
    let back = started + back_to(&lab, "fra-a-2", VIA_FRA_A_1, Duration::from_secs(10));
    eprintln!("back through fra-a-1 after {back:?} (its agent ready after {started:?})");
    assert!(
        back >= Duration::from_millis(1900),
        "held down first ({HOLD_DOWN} s): {back:?}"
    );

    // 2. Fabric only: fra-a-1's cable out, its agent alive (lease kept).
    let a = Client::start(&lab, "fra-a-2", lab::ORIGIN_V4_CHECK, 80);
    std::thread::sleep(Duration::from_millis(500));
    let fault = now_ms();
    lab.set_fabric_port("fra-a-1", false).unwrap();
    let fabric_only = failed_over("fabric-only fault", &a.finish(), fault, VIA_AMS_A_1);
    eprintln!("failover (fabric only): {fabric_only:?}");
    assert!(fabric_only < Duration::from_secs(3));
    lab.set_fabric_port("fra-a-1", true).unwrap();
    back_to(&lab, "fra-a-2", VIA_FRA_A_1, Duration::from_secs(10));

    // 3. Control only: fra-a-1's management link down (its lease lapses; fabric fine).
    let a = Client::start(&lab, "fra-a-2", lab::ORIGIN_V4_CHECK, 100);
    std::thread::sleep(Duration::from_millis(500));
    let fault = now_ms();
    lab.set_mgmt_link("fra-a-1", false).unwrap();
    let control_only = failed_over("control-only fault", &a.finish(), fault, VIA_AMS_A_1);
    eprintln!("failover (control only): {control_only:?}");
    assert!(
        control_only < Duration::from_secs(3),
        "fence (3/4 of the 1 s lease) + confirmation + detection: {control_only:?}"
    );
    // fra-a-1 fenced itself (it cannot renew its lease), and fra-a-2 took it down for that.
    let explained = explain_live(&lab, "fra-a-2");
    assert!(
        explained.contains("skipped (down): fra-a-1 (10.50.0.11): ")
            && explained.contains("fenced: its agent cannot renew its lease"),
        "{explained}"
    );
    wait_metric(&lab, "fra-a-1", "egress_fenced", 5);
    lab.set_mgmt_link("fra-a-1", true).unwrap();
    back_to(&lab, "fra-a-2", VIA_FRA_A_1, Duration::from_secs(15));

    // 3b. Agent only, on a peer watched only since a plan change. Without beta (ams-a-1 its
    //     only holder), fra-a-2 has no reason to watch ams-a-1; with fra-a-1's cable out it
    //     fails over to ams-a-1 and starts watching it (a watch added to its session's
    //     stream). ams-a-1's agent is then killed, its cable in (its programs still answer
    //     probes): its lease lapsing is what takes it down at fra-a-2.
    let rev = lab.publish(&without_beta()).unwrap();
    wait_applied(&lab, "fra-a-2", rev);
    assert!(
        !watched(&lab, "fra-a-2", "ams-a-1"),
        "not watched without beta"
    );
    lab.set_fabric_port("fra-a-1", false).unwrap();
    back_to(&lab, "fra-a-2", VIA_AMS_A_1, Duration::from_secs(10));
    assert!(
        watched(&lab, "fra-a-2", "ams-a-1"),
        "watched once it is the next tier"
    );
    lab.kill_agent("ams-a-1").unwrap();
    let t = Instant::now();
    loop {
        let explained = explain_live(&lab, "fra-a-2");
        if explained
            .lines()
            .any(|l| l.contains("ams-a-1 (10.50.2.31): ") && l.contains("agent lease gone"))
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "ams-a-1's lease gone, seen by fra-a-2 within 5 s: {explained}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // It stays down (acme is now unreachable from fra-a-2, so no plan needs ams-a-1: it must
    // stay watched, not come back as a fresh peer).
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        metric(&lab, "fra-a-2", "egress_peer_up{server=\"ams-a-1\"").ends_with(" 0"),
        "ams-a-1 still down at fra-a-2 2 s later: {}",
        explain_live(&lab, "fra-a-2")
    );
    lab.start_fleet_agent("ams-a-1", &["--hold-down", HOLD_DOWN])
        .unwrap();
    lab.set_fabric_port("fra-a-1", true).unwrap();
    let rev = lab.publish(DEFAULT_CONFIG).unwrap();
    for s in SERVERS {
        wait_applied(&lab, s, rev);
    }
    back_to(&lab, "fra-a-2", VIA_FRA_A_1, Duration::from_secs(15));
    // Step 4 needs ams-a-1 up at sin-a-1 first (its hold-down over).
    wait_metric(&lab, "sin-a-1", "egress_peer_up{server=\"ams-a-1\"", 10);

    // 4. The last tier: ams-a-1 (beta's only holder) dies; sin-a-1's new beta connections are
    //    unreachable, dropped and counted, not sent into a dead tunnel.
    let before = common::counter(&lab, "sin-a-1", "drop_pool_unreachable");
    lab.kill_agent("ams-a-1").unwrap();
    lab.set_fabric_port("ams-a-1", false).unwrap();
    let t = Instant::now();
    loop {
        let _ = lab.run(
            &lab.server_ns("sin-a-1"),
            "curl",
            &[
                "-s",
                "-m",
                "0.5",
                &format!("http://{}/", lab::ORIGIN_V4_HIGH),
            ],
        );
        if common::counter(&lab, "sin-a-1", "drop_pool_unreachable") > before {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "beta unreachable, counted, within 3 s"
        );
    }
    // acme still works from sin-a-1 (nearest location with a live holder: fra).
    common::check_curl(&lab, "sin-a-1", lab::ORIGIN_V4_CHECK.into(), VIA_FRA_A_1);
}
