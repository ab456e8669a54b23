//! End to end, operating it: reloads and agent restarts under real traffic, fail-closed
//! ordering, metrics, rejected configs. All five agents of the default lab run.

mod common;

use common::{FRA_A_2_IN_B, SERVERS, VIA_FRA_A_1, WantSrc, config_b, load};
use egress::{
    config::Config,
    lab::{self, Lab},
};
use egress_common::map_names;

fn full_lab() -> Lab {
    common::lab_with_agents(&SERVERS)
}

#[test]
fn twenty_reloads_under_load_break_nothing_and_new_connections_follow_the_plan() {
    let mut lab = full_lab();
    let a = Config::embedded();
    let b = config_b();
    let transfers = load(&lab);
    std::thread::sleep(std::time::Duration::from_millis(500));
    for i in 0..20 {
        let (config, want) = if i % 2 == 0 {
            (&b, FRA_A_2_IN_B)
        } else {
            (&a, VIA_FRA_A_1)
        };
        let said = lab.reload(config).expect("every agent reloads");
        for line in &said {
            assert!(
                line.contains("plan generation"),
                "reload {i} applied: {line}"
            );
        }
        // A new connection follows the new plan (a remote no long-lived transfer uses).
        common::check_curl(&lab, "fra-a-2", lab::ORIGIN_V4_CHECK.into(), want);
    }
    for t in transfers {
        t.finish();
    }
    assert!(
        common::counter(&lab, "fra-a-1", "soft_unicast") > 0,
        "replies for fra-a-2's new range went through fra-a-1"
    );
}

#[test]
fn agents_killed_and_restarted_lose_no_connection() {
    let mut lab = full_lab();
    let transfers = load(&lab);
    let ns = lab.server_ns("fra-a-1");
    for round in 0..3 {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let before = common::counter(&lab, "fra-a-1", "snat_established");
        lab.kill_agent("fra-a-1").unwrap();
        // While no agent runs, the programs stay attached: new connections are still translated.
        common::check_curl(&lab, "fra-a-1", lab::ORIGIN_V4_CHECK.into(), VIA_FRA_A_1);
        common::check_curl(&lab, "fra-a-2", lab::ORIGIN_V4_CHECK.into(), VIA_FRA_A_1);
        lab.start_agent("fra-a-1")
            .unwrap_or_else(|e| panic!("restart {round}: {e:#}"));
        let after = common::counter(&lab, "fra-a-1", "snat_established");
        assert!(
            after > before,
            "round {round}: counters continue across the restart ({before} → {after})"
        );
        let log = std::fs::read_to_string(lab.log_path("agent-fra-a-1")).unwrap();
        assert!(
            log.contains("TcxAdopted"),
            "round {round}: the restarted agent adopted the pinned links"
        );
    }
    let _ = ns;
    for t in transfers {
        t.finish();
    }
}

#[test]
fn traffic_never_leaves_from_the_server_address_once_the_dataplane_is_up() {
    // Requests loop from fra-a-1 to a policy destination while its agent starts, is killed,
    // and restarts. Before the first start they leave from 10.50.0.11 (no dataplane yet);
    // from the first translated request on, never again: the plan is written before the
    // programs attach, and they stay attached while the agent is away.
    let mut lab = common::lab(Config::embedded());
    let ns = lab.server_ns("fra-a-1");
    // Bounded: 3000 requests at most, and stopped as soon as enough were seen.
    let script = format!(
        "for i in $(seq 1 3000); do curl -s -m 2 -o /dev/null http://{}/ ; sleep 0.01; done",
        lab::ORIGIN_V4_CHECK
    );
    let mut looper = egress::lab::netns::command_in(&ns, "bash")
        .args(["-c", &script])
        .spawn()
        .unwrap();
    // Waits until the origin has seen at least `n` translated requests (20 s at most).
    let origin_log = lab.origin_log_path();
    let translated_at_least = |n: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let log = std::fs::read_to_string(&origin_log).unwrap_or_default();
            let seen = log
                .lines()
                .filter(|l| l.starts_with("tcp 192.0.2.10 "))
                .count();
            if seen >= n {
                return seen;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {seen} of {n} translated requests arrived"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    lab.start_agent("fra-a-1").unwrap();
    let seen = translated_at_least(5);
    lab.kill_agent("fra-a-1").unwrap();
    // Requests keep going while no agent runs.
    let seen = translated_at_least(seen + 5);
    lab.start_agent("fra-a-1").unwrap();
    translated_at_least(seen + 20);
    let _ = looper.kill();
    let _ = looper.wait();
    let log = std::fs::read_to_string(lab.origin_log_path()).unwrap();
    let sources: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("tcp "))
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    let first_pool = sources
        .iter()
        .position(|s| *s == "192.0.2.10")
        .expect("some requests were translated");
    assert!(
        sources.len() > first_pool + 20,
        "traffic kept flowing after the dataplane came up: {} requests, first translated: {first_pool}",
        sources.len()
    );
    let leaked: Vec<_> = sources[first_pool..]
        .iter()
        .filter(|s| **s != "192.0.2.10")
        .collect();
    assert!(
        leaked.is_empty(),
        "requests from a non-pool address after the dataplane came up: {leaked:?}"
    );
}

#[test]
fn metrics_move_with_traffic() {
    let lab = common::lab_with_agents(&["fra-a-1"]);
    let ns = lab.server_ns("fra-a-1");
    let scrape = || {
        lab.run(
            &ns,
            "curl",
            &["-sS", "--max-time", "5", "http://127.0.0.1:9464/metrics"],
        )
        .unwrap()
    };
    let value = |text: &str, series: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no series {series}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = scrape();
    lab.run(
        &ns,
        "ping",
        &[
            "-c",
            "10",
            "-i",
            "0.02",
            "-W",
            "2",
            &lab::ORIGIN_V4.to_string(),
        ],
    )
    .unwrap();
    let after = scrape();
    let moved = |series: &str| value(&after, series) - value(&before, series);
    let translated = moved(r#"egress_datapath_packets_total{counter="snat_new"}"#)
        + moved(r#"egress_datapath_packets_total{counter="snat_established"}"#);
    assert!(
        translated >= 10,
        "10 echo requests translated, metrics say {translated}"
    );
    assert!(
        moved(r#"egress_datapath_packets_total{counter="reverse_nat"}"#) >= 10,
        "10 replies"
    );
    assert!(
        moved(r#"egress_datapath_bytes_total{counter="egress_seen"}"#) >= 10 * 98,
        "bytes"
    );
    assert_eq!(value(&after, "egress_plan_generation"), 1);
    assert_eq!(
        value(
            &after,
            r#"egress_port_slice_size{address="192.0.2.10",ports="1024-32767"}"#
        ),
        31744
    );
    assert_eq!(value(&after, r#"egress_reloads_total{result="failed"}"#), 0);
    assert!(
        after.contains("egress_flow_entries{kind=\"outbound\"}"),
        "flow occupancy exported"
    );
    assert!(
        after.contains("egress_peer_up{server=\"ams-a-1\",fabric=\"10.50.2.31\"} 1"),
        "peers exported"
    );
}

/// The default topology plus `extra` servers (holding nothing).
fn with_servers(extra: u32) -> String {
    let mut text = egress::config::DEFAULT_CONFIG.to_string();
    for i in 0..extra {
        text.push_str(&format!(
            "\n[[servers]]\nname = \"x{i}\"\nid = {}\ndatacenter = \"sin-a\"\nfabric = \"{}\"\nuplink = \"eth0\"\n",
            100_000 + i,
            std::net::Ipv4Addr::from(0x0a40_0000 + i)
        ));
    }
    text
}

/// A topology too large for the maps (half of PEERS per plan: the next plan is written beside
/// the one in force) is refused naming the map, at start and on reload, before anything is
/// written; the plan in force stays.
#[test]
fn a_topology_over_capacity_is_refused_at_start_and_on_reload() {
    // Peers are every other server: one more than half the map.
    let over = egress_common::fabric::PEERS_CAPACITY / 2 + 2 - 5;
    let mut lab = common::lab_with_agents(&["fra-a-1"]);
    let said = lab.reload_text(&with_servers(over)).unwrap();
    assert!(
        said[0].contains("rejected") && said[0].contains("do not fit map PEERS"),
        "{}",
        said[0]
    );
    common::check_curl(&lab, "fra-a-1", lab::ORIGIN_V4.into(), VIA_FRA_A_1);
    // At start: exit 2-like refusal with the map named, nothing loaded for that server.
    let file = lab.work_dir().join("over.toml");
    std::fs::write(&file, with_servers(over)).unwrap();
    let pins = lab.work_dir().join("pins-over");
    let err = refusal(&lab, "fra-a-2", &file, "fra-a-2", &pins);
    assert!(err.contains("do not fit map PEERS"), "{err}");
    assert!(!pins.exists(), "nothing pinned");
}

/// The error of an agent started in `ns_server`'s namespace with `config` as `server`, its
/// maps to be pinned in `pins` (it must fail).
fn refusal(
    lab: &Lab,
    ns_server: &str,
    config: &std::path::Path,
    server: &str,
    pins: &std::path::Path,
) -> String {
    lab.run(
        &lab.server_ns(ns_server),
        common::EGRESS,
        &[
            "agent",
            "--no-metrics",
            "--config",
            config.to_str().unwrap(),
            "--server",
            server,
            "--pin-dir",
            pins.to_str().unwrap(),
        ],
    )
    .unwrap_err()
    .to_string()
}

/// An agent started for another server (an operator's wrong --server, whose uplink name
/// exists here too) is refused before anything is loaded or pinned, naming the address.
#[test]
fn an_agent_for_a_server_this_host_is_not_is_refused_before_anything_is_pinned() {
    let lab = common::lab_with_agents(&[]);
    // On bpffs (the lab's pin root), so that the address is what the agent refuses.
    let pins = lab.pin_dir("wrong-server");
    let err = refusal(&lab, "fra-a-2", &lab.config_path(), "fra-a-1", &pins);
    assert!(
        err.contains("10.50.0.11") && err.contains("is not an address of this host"),
        "{err}"
    );
    assert!(!pins.exists(), "nothing pinned");
}

#[test]
fn an_invalid_config_on_reload_keeps_the_old_plan() {
    let mut lab = common::lab_with_agents(&["fra-a-1"]);
    let bad = egress::config::DEFAULT_CONFIG.replace("32768-65535", "30000-65535");
    let said = lab.reload_text(&bad).unwrap();
    assert!(
        said[0].contains("rejected") && said[0].contains("pools[0].ipv4[0].shares[1].ports"),
        "the rejection names the field: {}",
        said[0]
    );
    common::check_curl(&lab, "fra-a-1", lab::ORIGIN_V4.into(), VIA_FRA_A_1);
    let ns = lab.server_ns("fra-a-1");
    let m = lab
        .run(&ns, "curl", &["-sS", "http://127.0.0.1:9464/metrics"])
        .unwrap();
    // The file watcher (every second) and the SIGHUP can both see the new file: one or two
    // rejections, never an applied reload.
    let failed = m
        .lines()
        .find_map(|l| l.strip_prefix("egress_reloads_total{result=\"failed\"} "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        matches!(failed, Some(1 | 2)),
        "rejection counted ({failed:?}): {m}"
    );
    assert!(
        m.contains("egress_reloads_total{result=\"ok\"} 0"),
        "nothing applied: {m}"
    );
    assert!(
        m.contains("egress_plan_generation 1"),
        "old plan still in force"
    );
    // Valid configs that move this server's uplink or fabric address: a running agent cannot
    // follow them (the programs stay where they are attached, LOCAL keeps the address), so
    // the reload is refused and says a restart applies it.
    let entry = "fabric = \"10.50.0.11\"\nuplink = \"eth0\"";
    for (moved, says) in [
        (
            "fabric = \"10.50.0.11\"\nuplink = \"bond0\"",
            "servers.fra-a-1.uplink changed from \"eth0\" to \"bond0\"",
        ),
        (
            "fabric = \"10.50.0.111\"\nuplink = \"eth0\"",
            "servers.fra-a-1.fabric changed from 10.50.0.11 to 10.50.0.111",
        ),
    ] {
        let text = egress::config::DEFAULT_CONFIG.replacen(entry, moved, 1);
        assert_ne!(
            text,
            egress::config::DEFAULT_CONFIG,
            "{moved}: edit applies"
        );
        egress::validate::validate(&egress::config::Config::parse(&text, "t").unwrap())
            .expect("a valid config");
        let said = lab.reload_text(&text).unwrap();
        assert!(
            said[0].contains("rejected") && said[0].contains(says) && said[0].contains("restart"),
            "{says}: {}",
            said[0]
        );
    }
    common::check_curl(&lab, "fra-a-1", lab::ORIGIN_V4.into(), VIA_FRA_A_1);
    let m = lab
        .run(&ns, "curl", &["-sS", "http://127.0.0.1:9464/metrics"])
        .unwrap();
    assert!(
        m.contains("egress_reloads_total{result=\"ok\"} 0")
            && m.contains("egress_plan_generation 1"),
        "nothing applied: {m}"
    );
}

#[test]
fn flows_and_live_explain_read_the_maps_and_detach_removes_everything() {
    let mut lab = common::lab_with_agents(&["fra-a-1", "fra-a-2"]);
    common::check_curl(&lab, "fra-a-2", lab::ORIGIN_V4.into(), VIA_FRA_A_1);
    let config_path = lab.config_path();
    let egress = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(common::EGRESS)
            .args(args)
            .arg("--config")
            .arg(&config_path)
            .args(["--format", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let pins: std::collections::BTreeMap<&str, String> = ["fra-a-1", "fra-a-2"]
        .into_iter()
        .map(|s| (s, lab.pin_dir(s).to_str().unwrap().to_string()))
        .collect();
    let pin = |s: &str| pins[s].clone();
    let local = egress(&[
        "flows",
        "--pin-dir",
        &pin("fra-a-2"),
        "--dst",
        "203.0.113.1",
    ]);
    assert!(
        local
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["path"] == "forwarded" && r["via"] == "fra-a-1" && r["pool"] == "acme"),
        "fra-a-2 lists its forwarded connection: {local}"
    );
    let peer = egress(&["flows", "--pin-dir", &pin("fra-a-1"), "--pool", "acme"]);
    assert!(
        peer.as_array().unwrap().iter().any(|r| r["path"] == "peer"
            && r["via"] == "fra-a-2"
            && r["translated"].as_str().unwrap().starts_with("192.0.2.10:")
            // curl closed it: the socket's FIN.
            && r["state"] == "closing"),
        "fra-a-1 lists the connection it translates for fra-a-2: {peer}"
    );
    let live = egress(&[
        "explain",
        "--live",
        "--pin-dir",
        &pin("fra-a-2"),
        "--dst",
        "203.0.113.1",
        "--mark",
        "3",
    ]);
    assert_eq!(
        (live["action"].as_str(), live["pool_name"].as_str()),
        (Some("forward"), Some("acme")),
        "{live}"
    );
    assert_eq!(live["fell_back_to_mark_0"], true);
    assert_eq!(live["passed_early"], false, "a policy destination: {live}");
    let elsewhere = egress(&[
        "explain",
        "--live",
        "--pin-dir",
        &pin("fra-a-2"),
        "--dst",
        &lab::ORIGIN_V4_NO_POLICY.to_string(),
    ]);
    assert!(elsewhere["pool"].is_null(), "{elsewhere}");
    assert_eq!(elsewhere["passed_early"], true, "{elsewhere}");
    assert!(
        live["next_hops"][0]
            .as_str()
            .unwrap()
            .starts_with("fra-a-1"),
        "{live}"
    );

    // A clean stop leaves the programs attached; detach removes links and maps.
    let status = lab.stop("agent-fra-a-2").unwrap();
    assert!(status.success());
    common::check_curl(&lab, "fra-a-2", lab::ORIGIN_V4_CHECK.into(), VIA_FRA_A_1);
    // Something else's pins in the same directory (an operator pointing --pin-dir at a shared
    // place): detach removes only the agent's own names.
    let foreign = lab.pin_dir("fra-a-2").join("someone_else");
    std::fs::create_dir(&foreign).unwrap();
    let out = std::process::Command::new(common::EGRESS)
        .args(["detach", "--pin-dir", &pin("fra-a-2")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(foreign.exists(), "another program's pins stay");
    let left: Vec<_> = std::fs::read_dir(lab.pin_dir("fra-a-2"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["someone_else"], "every pin of the agent removed");
    std::fs::remove_dir(&foreign).unwrap();
    std::fs::remove_dir(lab.pin_dir("fra-a-2")).unwrap();
    let own = WantSrc {
        addr: "10.50.0.12",
        ports: (1, 65535),
    };
    common::check_curl(&lab, "fra-a-2", lab::ORIGIN_V4_CHECK.into(), own);
}

#[test]
fn a_slice_past_eighty_percent_is_reported() {
    // fra-a-1 holds only 10 ports; 9 connections held open use 90 % of them.
    let text = egress::config::DEFAULT_CONFIG.replace("1024-32767", "1024-1033");
    let mut lab = common::lab(Config::parse(&text, "small").unwrap());
    lab.start_agent("fra-a-1").unwrap();
    let from = lab.log_len("agent-fra-a-1");
    let url = format!("http://{}/delay/8000", lab::ORIGIN_V4);
    let mut args = vec![
        "-sS",
        "--max-time",
        "20",
        "--parallel",
        "--parallel-immediate",
    ];
    args.extend(std::iter::repeat_n(url.as_str(), 9));
    let mut held = egress::lab::netns::command_in(&lab.server_ns("fra-a-1"), "curl")
        .args(&args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let line = lab.wait_for_log(
        "agent-fra-a-1",
        from,
        &["port slice"],
        std::time::Duration::from_secs(15),
    );
    let _ = held.kill();
    let _ = held.wait();
    let line = line.expect("the agent warns within one housekeeping interval");
    assert!(
        line.contains("WARN") && line.contains("192.0.2.10 1024-1033 is 90% used (9 of 10 ports)"),
        "{line}"
    );
    let m = lab
        .run(
            &lab.server_ns("fra-a-1"),
            "curl",
            &["-sS", "http://127.0.0.1:9464/metrics"],
        )
        .unwrap();
    assert!(
        m.contains("egress_port_slice_used{address=\"192.0.2.10\",ports=\"1024-1033\"} 9"),
        "{m}"
    );
    assert!(
        m.contains("egress_map_entries{map=\"POLICY_V4\"} 2"),
        "plan map occupancy exported"
    );
}

/// A second agent started by mistake on a server's pins exits at once, naming the running one,
/// and touches nothing: the first agent's plan and traffic stay as they were.
#[test]
fn a_second_agent_on_the_same_pins_exits_at_once() {
    let lab = common::lab_with_agents(&["fra-a-1"]);
    // Its config has no policies: had it written its plan, fra-a-1's traffic would leave from
    // the server's own address.
    let mut other = Config::embedded();
    other.policies.clear();
    let other_path = lab.work_dir().join("second.toml");
    std::fs::write(&other_path, toml::to_string(&other).unwrap()).unwrap();
    let out = egress::lab::netns::command_in(&lab.server_ns("fra-a-1"), common::EGRESS)
        .arg("agent")
        .arg("--config")
        .arg(&other_path)
        .args(["--server", "fra-a-1", "--no-metrics", "--pin-dir"])
        .arg(lab.pin_dir("fra-a-1"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {err}");
    let first = lab.pids();
    assert!(
        first
            .iter()
            .any(|pid| err.contains(&format!("another agent (pid {pid}) is running on"))),
        "names the running agent {first:?}: {err}"
    );
    assert!(
        err.contains(lab.pin_dir("fra-a-1").to_str().unwrap()),
        "names the pin directory: {err}"
    );
    // Another pin directory does not make it harmless: the interface is taken too.
    let elsewhere = lab.pin_dir("elsewhere");
    let out = egress::lab::netns::command_in(&lab.server_ns("fra-a-1"), common::EGRESS)
        .arg("agent")
        .arg("--config")
        .arg(&other_path)
        .args(["--server", "fra-a-1", "--no-metrics", "--pin-dir"])
        .arg(&elsewhere)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(
        err.contains("is running on interface eth0"),
        "names the interface: {err}"
    );
    // Nor can `egress detach` pull the pins from under it.
    let out = std::process::Command::new(common::EGRESS)
        .args(["detach", "--pin-dir"])
        .arg(lab.pin_dir("fra-a-1"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "detach refused: {err}");
    assert!(err.contains("another agent (pid"), "{err}");
    assert!(lab.pin_dir("fra-a-1").join("FLOWS").exists());
    // Nothing was written: the first agent's plan still translates.
    common::check_curl(&lab, "fra-a-1", lab::ORIGIN_V4.into(), VIA_FRA_A_1);
    let log = std::fs::read_to_string(lab.log_path("agent-fra-a-1")).unwrap();
    assert!(
        !log.contains("reload"),
        "the first agent saw no change: {log}"
    );
}

/// `v`'s bytes as bpftool takes them (`hex 0a 32 …`).
fn hex_words<T: Copy>(v: &T) -> Vec<String> {
    // SAFETY: T is a plain repr(C) value; its bytes are read, not interpreted.
    let bytes =
        unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A pinned map of another layout (an older version's) is refused with both layouts named,
/// before anything is written; `--migrate` recreates it and carries the flow entries over.
#[test]
fn pinned_maps_of_another_layout_are_refused_or_migrated() {
    use egress_common::flow::{FLOW_OUTBOUND, FlowKey, FlowValue};
    let mut lab = common::lab(Config::embedded());
    let pins = lab.pin_dir("fra-a-1");
    std::fs::create_dir_all(&pins).unwrap();
    let flows = pins.join("FLOWS");
    let bpftool = |args: &[&str]| {
        let out = std::process::Command::new("bpftool")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let create = |value: &str| {
        let _ = std::fs::remove_file(&flows);
        bpftool(&[
            "map",
            "create",
            flows.to_str().unwrap(),
            "type",
            "lru_hash",
            "key",
            "40",
            "value",
            value,
            "entries",
            "1024",
            "name",
            "FLOWS",
        ]);
    };
    let agent = |extra: &[&str]| {
        egress::lab::netns::command_in(&lab.server_ns("fra-a-1"), common::EGRESS)
            .arg("agent")
            .arg("--config")
            .arg(lab.config_path())
            .args(["--server", "fra-a-1", "--no-metrics", "--pin-dir"])
            .arg(&pins)
            .args(extra)
            .output()
            .unwrap()
    };

    // Values of another size: refused, naming the map and both layouts; nothing else pinned.
    create("64");
    let out = agent(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    for needle in [
        "pinned map FLOWS",
        "pinned lru_hash, key 40 B, value 64 B",
        "expected hash, key 40 B, value 48 B",
        "--migrate",
    ] {
        assert!(err.contains(needle), "mentions {needle:?}: {err}");
    }
    let pinned: Vec<_> = std::fs::read_dir(&pins)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(pinned, ["FLOWS"], "nothing else was created");

    // An older LRU flow table with live entries: --migrate carries them over.
    create("48");
    let key = FlowKey {
        src: [10, 50, 0, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        dst: [203, 0, 113, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        src_port_be: 5555u16.to_be(),
        dst_port_be: 80u16.to_be(),
        proto: 6,
        family: 4,
        _pad: [0; 2],
    };
    let value = FlowValue {
        addr: [192, 0, 2, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        port_be: 2000u16.to_be(),
        kind: FLOW_OUTBOUND,
        pool: 7,
        // Fresh: the agent's first collection must not find it expired.
        last_seen_ns: egress::flows::monotonic_ns(),
        ..Default::default()
    };
    let mut args = vec![
        "map",
        "update",
        "pinned",
        flows.to_str().unwrap(),
        "key",
        "hex",
    ];
    let (k, v) = (hex_words(&key), hex_words(&value));
    args.extend(k.iter().map(String::as_str));
    args.extend(["value", "hex"]);
    args.extend(v.iter().map(String::as_str));
    bpftool(&args);
    lab.start_agent_with("fra-a-1", &["--migrate"]).unwrap();
    let log = std::fs::read_to_string(lab.log_path("agent-fra-a-1")).unwrap();
    assert!(
        log.contains("migrating FLOWS: pinned lru_hash")
            && log.contains("migration: 1 of 1 flow entries carried over"),
        "migrated: {log}"
    );
    let data = aya::maps::MapData::from_pin(&flows).unwrap();
    let table: aya::maps::HashMap<_, FlowKey, FlowValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("now a hash map");
    // Carried as replied: older versions did not record replies, and the connection must not
    // be collected as unreplied after the upgrade.
    let carried = FlowValue {
        flags: egress_common::flow::FLOW_F_REPLIED,
        ..value
    };
    assert_eq!(
        table.get(&key, 0).unwrap(),
        carried,
        "the entry carried over"
    );
    assert!(
        !pins.join("FLOWS_pre_migrate").exists(),
        "the old table set aside is gone once the agent is up"
    );
    common::check_curl(&lab, "fra-a-1", lab::ORIGIN_V4.into(), VIA_FRA_A_1);

    // A migration that failed after setting the flow table aside (a verifier refusal, no
    // memory for the new table): the next start, without --migrate, finds no mismatch but
    // carries the entries set aside into its table, and removes them once attached.
    drop(table);
    lab.kill_agent("fra-a-1").unwrap();
    let read = |path: &std::path::Path| -> Vec<FlowKey> {
        let data = aya::maps::MapData::from_pin(path).unwrap();
        let t: aya::maps::HashMap<_, FlowKey, FlowValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
        t.keys().map(Result::unwrap).collect()
    };
    let before = read(&flows);
    assert!(!before.is_empty(), "curl's connection has entries");
    let aside = pins.join("FLOWS_pre_migrate");
    aya::maps::MapData::from_pin(&flows)
        .unwrap()
        .pin(&aside)
        .unwrap();
    std::fs::remove_file(&flows).unwrap();
    let from = lab.log_len("agent-fra-a-1");
    lab.start_agent("fra-a-1").unwrap();
    let log = std::fs::read_to_string(lab.log_path("agent-fra-a-1")).unwrap();
    let log = &log[from.min(log.len())..];
    let n = before.len();
    assert!(
        log.contains("an earlier migration did not finish")
            && log.contains(&format!("migration: {n} of {n} flow entries carried over")),
        "carried: {log}"
    );
    let after = read(&flows);
    for k in &before {
        assert!(after.contains(k), "{k:?} carried over");
    }
    assert!(
        !aside.exists(),
        "the table set aside is gone once the agent is up"
    );
    common::check_curl(&lab, "fra-a-1", lab::ORIGIN_V4.into(), VIA_FRA_A_1);
}

/// Scrapers that connect and never send, or never read, hold no one up: a reload completes at
/// once and a real scrape is still answered.
#[test]
fn idle_scrapers_never_delay_the_agent() {
    let mut lab = common::lab_with_agents(&["fra-a-1"]);
    let ns = lab.server_ns("fra-a-1");
    let idle: Vec<std::net::TcpStream> = egress::lab::netns::in_ns(&ns, || {
        let mut v = Vec::new();
        for i in 0..12 {
            let mut s = std::net::TcpStream::connect("127.0.0.1:9464")?;
            if i == 0 {
                // Asks, and never reads the answer.
                std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.1\r\n\r\n")?;
            }
            v.push(s);
        }
        Ok(v)
    })
    .unwrap();
    let t0 = std::time::Instant::now();
    let lines = lab.reload(&config_b()).unwrap();
    let took = t0.elapsed();
    assert!(
        lines.iter().all(|l| l.contains("plan generation 2")),
        "{lines:?}"
    );
    assert!(
        took < std::time::Duration::from_secs(2),
        "the reload waited {took:?} behind idle scrapers"
    );
    let body = lab
        .run(
            &ns,
            "curl",
            &["-sS", "--max-time", "20", "http://127.0.0.1:9464/metrics"],
        )
        .unwrap();
    assert!(body.contains("egress_plan_generation 2"), "{body}");
    drop(idle);
}

/// Removing the pin directory under a running agent detaches nothing (the agent holds its links)
/// and is repaired within a second or two: maps and links pinned again, the same plan and flows;
/// traffic leaves from the pool address throughout.
#[test]
fn a_removed_pin_directory_is_restored() {
    let lab = common::lab_with_agents(&["fra-a-1"]);
    common::check_curl(&lab, "fra-a-1", lab::ORIGIN_V4.into(), VIA_FRA_A_1);
    let pins = lab.pin_dir("fra-a-1");
    let from = lab.log_len("agent-fra-a-1");
    let removed = egress::loader::detach(&pins).unwrap();
    assert!(!removed.is_empty() && !pins.exists());
    // The agent holds its links: nothing detached, even before the repair.
    common::check_curl(&lab, "fra-a-1", lab::ORIGIN_V4.into(), VIA_FRA_A_1);
    let line = lab
        .wait_for_log(
            "agent-fra-a-1",
            from,
            &["repaired:"],
            std::time::Duration::from_secs(5),
        )
        .unwrap();
    assert!(
        line.contains("link_tc_egress") && line.contains("map FLOWS"),
        "{line}"
    );
    for name in [
        "FLOWS",
        "STATS",
        "JUMP",
        "link_tc_egress",
        "link_tc_ingress",
    ] {
        assert!(pins.join(name).exists(), "{name} pinned again");
    }
    common::check_curl(&lab, "fra-a-1", lab::ORIGIN_V4.into(), VIA_FRA_A_1);
    let metrics = common::metrics(&lab, "fra-a-1");
    assert!(metrics.contains("egress_repairs_total 1"), "{metrics}");
    assert!(metrics.contains("egress_attached 1"), "{metrics}");
}

/// A plan the kernel refuses half-way (here: ACTIONS filled to the brim behind the agent's back,
/// in the generation in force, where a switch cannot make room) is never switched to: the
/// running plan stays in force, and the plan is retried with a growing delay — not every second
/// — and applied once the write can succeed.
#[test]
fn a_plan_that_fails_to_be_written_is_retried_with_backoff() {
    use egress_common::action::{Action, ActionKey};
    let mut lab = common::lab_with_agents(&["fra-a-1"]);
    let pins = lab.pin_dir("fra-a-1");
    let data = aya::maps::MapData::from_pin(pins.join("ACTIONS")).unwrap();
    let mut actions: aya::maps::HashMap<_, ActionKey, Action> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
    let generation: aya::maps::Array<_, u32> = aya::maps::Array::try_from(aya::maps::Map::Array(
        aya::maps::MapData::from_pin(pins.join("GENERATION")).unwrap(),
    ))
    .unwrap();
    let in_force = generation.get(&0, 0).unwrap() as u8;
    // Junk keys (pool ids no config can have) until the map is full.
    let mut junk = Vec::new();
    for pool in 0x7fff_0000u32.. {
        let k = ActionKey::in_gen(pool, 4, in_force);
        if actions.insert(k, Action::default(), 0).is_err() {
            break;
        }
        junk.push(k);
    }
    // A new pool: its action needs a new entry.
    let mut more = Config::embedded();
    let mut extra = more.pools[0].clone();
    extra.name = "extra".into();
    extra.id = 99;
    extra.ipv6_prefix = None;
    extra.ipv4 = vec![egress::config::PoolAddress {
        address: "192.0.2.99".parse().unwrap(),
        shares: vec![egress::config::Share {
            server: "fra-a-1".into(),
            ports: "1024-2000".into(),
        }],
    }];
    more.pools.push(extra);
    let from = lab.log_len("agent-fra-a-1");
    let lines = lab.reload(&more).unwrap();
    assert!(
        lines[0].contains("failed while writing maps") && lines[0].contains("trying again in 5s"),
        "{lines:?}"
    );
    // The running plan is in force, and it is not retried every second.
    common::check_curl(&lab, "fra-a-1", lab::ORIGIN_V4.into(), VIA_FRA_A_1);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let log = std::fs::read_to_string(lab.log_path("agent-fra-a-1")).unwrap();
    assert_eq!(
        log[from..].matches("failed while writing maps").count(),
        1,
        "one failure, no flapping: {}",
        &log[from..]
    );
    // A refused config meanwhile ends the retries (the file no longer holds that plan): one
    // refusal, not one a second once the retry falls due (5 s).
    let mut bad = more.clone();
    bad.policies[0].pool = "no-such-pool".into();
    let from_bad = lab.log_len("agent-fra-a-1");
    let lines = lab.reload(&bad).unwrap();
    assert!(lines[0].contains("rejected"), "{lines:?}");
    std::thread::sleep(std::time::Duration::from_secs(8));
    let log = std::fs::read_to_string(lab.log_path("agent-fra-a-1")).unwrap();
    assert_eq!(
        log[from_bad..].matches("rejected").count(),
        1,
        "refused once: {}",
        &log[from_bad..]
    );
    // The plan again, still no room: it fails and is retried.
    let lines = lab.reload(&more).unwrap();
    assert!(lines[0].contains("failed while writing maps"), "{lines:?}");
    // Room again: the retry applies it.
    for k in &junk {
        let _ = actions.remove(k);
    }
    let line = lab
        .wait_for_log(
            "agent-fra-a-1",
            from,
            // (A liveness switch may come in between: ams-a-1 runs no agent here.)
            &["retrying the plan that failed to be written): plan generation"],
            std::time::Duration::from_secs(10),
        )
        .unwrap();
    assert!(line.contains("4 entries"), "the new pool's plan: {line}");
    common::check_curl(&lab, "fra-a-1", lab::ORIGIN_V4.into(), VIA_FRA_A_1);
}

/// `--xdp` over an agent's life: attached in native mode (a link pinned like the TC ones,
/// the metric says so); a removed pin is put back with nothing detached; a restart with it
/// adopts the link; a restart without it detaches the program.
#[test]
fn xdp_is_attached_kept_through_repairs_and_restarts_and_detached_without_the_flag() {
    let mut lab = common::lab(Config::embedded());
    lab.start_agent_xdp("fra-a-1").unwrap();
    let ns = lab.server_ns("fra-a-1");
    let on_uplink = |lab: &Lab| {
        lab.run(&ns, "ip", &["-d", "link", "show", "eth0"])
            .unwrap()
            .contains("prog/xdp")
    };
    lab.wait_for_log(
        "agent-fra-a-1",
        0,
        &["xdp_ingress attached to eth0 (native mode)"],
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    assert!(on_uplink(&lab), "xdp_ingress on eth0");
    let metrics = lab
        .run(
            &ns,
            "curl",
            &["-sS", "--max-time", "10", "http://127.0.0.1:9464/metrics"],
        )
        .unwrap();
    assert!(metrics.contains("egress_xdp_attached 1"), "{metrics}");
    common::check_curl(&lab, "fra-a-1", lab::ORIGIN_V4.into(), VIA_FRA_A_1);
    assert!(
        common::counter(&lab, "fra-a-1", "xdp_done") > 0,
        "replies finished in XDP"
    );

    let pin = lab.pin_dir("fra-a-1").join("link_xdp_ingress");
    let from = lab.log_len("agent-fra-a-1");
    std::fs::remove_file(&pin).unwrap();
    assert!(on_uplink(&lab), "held by the agent: still attached");
    let line = lab
        .wait_for_log(
            "agent-fra-a-1",
            from,
            &["repaired:"],
            std::time::Duration::from_secs(5),
        )
        .unwrap();
    assert!(line.contains("link_xdp_ingress") && pin.exists(), "{line}");

    lab.stop("agent-fra-a-1").unwrap();
    assert!(on_uplink(&lab), "the pinned link outlives the agent");
    let from = lab.log_len("agent-fra-a-1");
    lab.start_agent_with("fra-a-1", &["--xdp"]).unwrap();
    lab.wait_for_log(
        "agent-fra-a-1",
        from,
        &["its link adopted"],
        std::time::Duration::from_secs(5),
    )
    .unwrap();

    lab.stop("agent-fra-a-1").unwrap();
    let from = lab.log_len("agent-fra-a-1");
    lab.start_agent("fra-a-1").unwrap();
    lab.wait_for_log(
        "agent-fra-a-1",
        from,
        &["xdp_ingress detached from eth0"],
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    assert!(!on_uplink(&lab), "detached");
    common::check_curl(&lab, "fra-a-1", lab::ORIGIN_V4.into(), VIA_FRA_A_1);
}

/// The pass filter in a running agent: its collections pass every destination but the plan's
/// and live connections'; a reload that removes every policy leaves a live download's
/// destination admitted (every packet still translated, the download intact) while the next
/// collections pass the destinations of a removed policy that no connection uses.
#[test]
fn a_live_connection_keeps_its_destination_admitted_after_its_policy_is_removed() {
    // One more policy, for destinations nothing connects to.
    let text = format!(
        "{}\n[[policies]]\npool = \"acme\"\ndestinations = [\"10.200.0.0/24\"]\n",
        egress::config::DEFAULT_CONFIG
    );
    let mut lab = common::lab(Config::parse(&text, "test").unwrap());
    lab.start_agent_with("fra-a-1", &["--gc-interval", "1"])
        .expect("agent starts");
    let origin = ipv4_16(lab::ORIGIN_V4.octets());
    let elsewhere = ipv4_16(lab::ORIGIN_V4_NO_POLICY.octets());
    let unused = ipv4_16([10, 200, 0, 1]);
    let passes = |lab: &Lab, dst: &[u8; 16]| -> bool {
        let path = lab.pin_dir("fra-a-1").join(map_names::PASS_FILTER);
        let map = aya::maps::MapData::from_pin(&path).expect("PASS_FILTER pinned");
        let array = aya::maps::Array::try_from(aya::maps::Map::Array(map)).expect("an array");
        egress::filter::PassFilter::new(array)
            .passes(4, dst)
            .expect("PASS_FILTER read")
    };
    // After a collection: the policy's destination admitted, one without a policy passed.
    wait_for(
        || passes(&lab, &elsewhere),
        "a destination without policy passed",
    );
    assert!(!passes(&lab, &origin), "a policy destination is admitted");
    assert!(!passes(&lab, &unused), "so is one nothing connects to");
    let metrics = common::metrics(&lab, "fra-a-1");
    let passing: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"egress_pass_filter_buckets{family="ipv4"} "#))
        .expect("the pass filter's metric")
        .parse()
        .unwrap();
    // 2^20 buckets but the few of the lab's policies and pool addresses.
    assert!((1_048_500..1_048_576).contains(&passing), "{passing}");
    // Longer than the socket buffers hold: packets flow both ways until its end.
    let download = common::Transfer::start(&lab, "fra-a-1", lab::ORIGIN_V4, 32 << 20, "4M", 0);
    let established = |lab: &Lab| common::counter(lab, "fra-a-1", "snat_established");
    let start = established(&lab);
    wait_for(
        || established(&lab) >= start + 5,
        "the download flows (translated)",
    );
    let mut c = Config::parse(&text, "test").unwrap();
    c.policies.clear();
    lab.reload(&c).expect("the agent reloads");
    let before = established(&lab);
    wait_for(
        || established(&lab) > before,
        "the download's packets after the reload are translated",
    );
    // The collections after the reload, the download still running: the removed policy's
    // unused destinations pass, the live download's stays admitted.
    wait_for(
        || passes(&lab, &unused),
        "a removed policy's unused destination passed",
    );
    assert!(
        !passes(&lab, &origin),
        "the live download's destination stays admitted"
    );
    // Every byte arrived: its packets after the reload left translated (untranslated, the
    // origin would have answered a source it never heard of).
    download.finish();
}

fn ipv4_16(a: [u8; 4]) -> [u8; 16] {
    let mut d = [0; 16];
    d[..4].copy_from_slice(&a);
    d
}

/// Polls `ok` for up to 10 s.
fn wait_for(ok: impl Fn() -> bool, what: &str) {
    for _ in 0..100 {
        if ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("not within 10 s: {what}");
}

/// A restarted agent keeps the peers its predecessor left down (the adopted `PEERS` flags)
/// until they answer: its first plan already goes around them, instead of sending new
/// connections into a dead peer's tunnel for a grace period after every restart.
#[test]
fn a_restarted_agent_keeps_down_the_peers_its_predecessor_saw_down() {
    let mut lab = common::lab_with_agents(&["fra-a-1"]);
    // ams-a-1 runs no agent here: its fabric probes go unanswered.
    lab.wait_for_log(
        "agent-fra-a-1",
        0,
        &["reload (liveness: down ams-a-1"],
        std::time::Duration::from_secs(15),
    )
    .unwrap();
    lab.kill_agent("fra-a-1").unwrap();
    let from = lab.log_len("agent-fra-a-1");
    lab.start_agent("fra-a-1").unwrap();
    let line = lab
        .wait_for_log(
            "agent-fra-a-1",
            from,
            &["kept down until they answer"],
            std::time::Duration::from_secs(5),
        )
        .unwrap();
    assert!(
        line.contains("ams-a-1 (fabric probes unanswered)"),
        "{line}"
    );
    let metrics = common::metrics(&lab, "fra-a-1");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("egress_peer_up{server=\"ams-a-1\"") && l.ends_with(" 0")),
        "down from the start: {metrics}"
    );
    // Past the grace period and the misses a fresh watch would need: no switch at all.
    std::thread::sleep(std::time::Duration::from_secs(5));
    let log = std::fs::read_to_string(lab.log_path("agent-fra-a-1")).unwrap();
    assert!(
        !log[from..].contains("reload (liveness:"),
        "no liveness switch after the restart: {}",
        &log[from..]
    );
    common::check_curl(&lab, "fra-a-1", lab::ORIGIN_V4.into(), VIA_FRA_A_1);
}
