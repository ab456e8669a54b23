//! End to end: the agent attaches in a server namespace, real traffic moves its counters,
//! bpftool reads the pinned maps with field names, and teardown leaves nothing behind.

mod common;

use std::{path::Path, process::Command};

use egress::{config::Config, lab, stats};

fn counter(values: &[stats::StatValue], name: &str) -> stats::StatValue {
    *values.iter().find(|v| v.name == name).expect(name)
}

#[test]
fn agent_counts_real_traffic_and_teardown_leaves_nothing() {
    let mut lab = common::lab(Config::embedded());
    let server = "fra-a-1";
    lab.start_agent(server).expect("agent starts");
    let pin_dir = lab.pin_dir(server);
    let before = stats::read(&pin_dir).expect("stats readable");

    // 10 echo requests out, 10 replies in, plus two HTTP exchanges to destinations no policy
    // covers (so they leave from the server's own addresses).
    let ns = lab.server_ns(server);
    lab.run(
        &ns,
        "ping",
        &[
            "-c",
            "10",
            "-i",
            "0.01",
            "-W",
            "2",
            &lab::ORIGIN_V4.to_string(),
        ],
    )
    .expect("ping through the attached programs");
    let v4: serde_json::Value = serde_json::from_str(
        &lab.curl(server, &format!("http://{}/", lab::ORIGIN_V4_NO_POLICY))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        v4["src"], "10.50.0.11",
        "origin saw the server's own v4 address"
    );
    let v6: serde_json::Value = serde_json::from_str(
        &lab.curl(server, &format!("http://[{}]/", lab::ORIGIN_V6_NO_POLICY))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        v6["src"], "fd00:50::b",
        "origin saw the server's own v6 address"
    );

    let after = stats::read(&pin_dir).unwrap();
    // Each curl sends at least SYN, ACK+request, FIN and receives at least SYN-ACK, response, FIN.
    let sent = 10 + 2 * 3;
    for name in ["egress_seen", "ingress_seen"] {
        let (b, a) = (counter(&before, name), counter(&after, name));
        assert!(
            a.packets - b.packets >= sent,
            "{name}: moved {} packets, expected at least {sent}",
            a.packets - b.packets
        );
        assert!(
            a.bytes - b.bytes >= sent * 54,
            "{name}: bytes moved {}",
            a.bytes - b.bytes
        );
    }

    // The CLI reads the same pins.
    let out = Command::new(common::EGRESS)
        .args(["stats", "--format", "json", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "egress stats: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        json.as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "egress_seen" && v["packets"].as_u64().unwrap() >= sent)
    );

    // bpftool shows named fields thanks to BTF.
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(pin_dir.join("STATS"))
        .output()
        .expect("bpftool installed by xtask setup");
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("\"packets\"") && dump.contains("\"bytes\""),
        "bpftool dump: {dump}"
    );

    // The agent exits cleanly on SIGTERM.
    let status = lab.stop(&format!("agent-{server}")).unwrap();
    assert!(status.success(), "agent exit status {status}");

    let prefix = lab.prefix.clone();
    let pids = lab.pids();
    let pin_root = pin_dir.parent().unwrap().to_path_buf();
    let work = lab.work_dir().to_path_buf();
    drop(lab);
    let left = egress::lab::netns::list(&prefix).unwrap();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} left"
        );
    }
    assert!(!pin_root.exists(), "pins left in {}", pin_root.display());
    assert!(!work.exists(), "work dir left: {}", work.display());
}

#[test]
fn lab_is_removed_when_a_test_panics() {
    let lab = common::lab(Config::embedded());
    let prefix = lab.prefix.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _lab = lab;
        panic!("simulated test failure");
    }));
    assert!(result.is_err());
    assert!(
        egress::lab::netns::list(&prefix).unwrap().is_empty(),
        "namespaces survived a panic"
    );
}

#[test]
fn lab_has_no_route_out() {
    let lab = common::lab(Config::embedded());
    for ns in lab.namespaces() {
        let routes = egress::lab::netns::ip_in(ns, &["route", "show", "default"]).unwrap();
        assert!(
            routes.trim().is_empty(),
            "{ns} has a default route: {routes}"
        );
        let routes6 = egress::lab::netns::ip_in(ns, &["-6", "route", "show", "default"]).unwrap();
        assert!(
            routes6.trim().is_empty(),
            "{ns} has a default v6 route: {routes6}"
        );
    }
}
