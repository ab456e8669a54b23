//! End to end, local egress: real connections from a server holding a pool address, checked
//! against what the origin saw. Default config: fra-a-1 holds 192.0.2.10 ports 1024-32767 and,
//! like every server, its own address in 2001:db8:7::/64 for destinations 203.0.113.0/24 and
//! 2001:db8:beef::/48.

mod common;

use std::collections::BTreeSet;

use common::seen;
use egress::lab::{self, origin};

const SERVER: &str = "fra-a-1";

#[test]
fn curl_v4_and_v6_leave_from_the_pool_and_no_policy_from_the_server() {
    let lab = common::lab_with_agents(&[SERVER]);
    let (src, port) = seen(
        &lab.curl(SERVER, &format!("http://{}/", lab::ORIGIN_V4))
            .unwrap(),
    );
    assert_eq!(src, "192.0.2.10", "v4 source is the pool address");
    assert!(
        (1024..=32767).contains(&port),
        "v4 port {port} is in fra-a-1's share"
    );

    let (src, port) = seen(
        &lab.curl(SERVER, &format!("http://[{}]/", lab::ORIGIN_V6))
            .unwrap(),
    );
    assert_eq!(
        src, "2001:db8:7::b",
        "v6 source is the pool prefix + server id 11"
    );
    assert!(port >= 1024, "v6 port {port} is in 1024-65535");

    let (src, _) = seen(
        &lab.curl(SERVER, &format!("http://{}/", lab::ORIGIN_V4_NO_POLICY))
            .unwrap(),
    );
    assert_eq!(src, "10.50.0.11", "no policy: the server's own address");
    let (src, _) = seen(
        &lab.curl(SERVER, &format!("http://[{}]/", lab::ORIGIN_V6_NO_POLICY))
            .unwrap(),
    );
    assert_eq!(src, "fd00:50::b", "no policy: the server's own v6 address");
}

#[test]
fn two_hundred_concurrent_connections_get_distinct_ports() {
    let lab = common::lab_with_agents(&[SERVER]);
    // Each request is held 1.5 s by the origin, so all 200 connections are open at once.
    let url = format!("http://{}/delay/1500", lab::ORIGIN_V4);
    let mut args = vec![
        "-sS",
        "--max-time",
        "30",
        "--parallel",
        "--parallel-immediate",
        "--parallel-max",
        "200",
    ];
    args.extend(std::iter::repeat_n(url.as_str(), 200));
    let out = lab
        .run(&lab.server_ns(SERVER), "curl", &args)
        .expect("all 200 transfers succeed");
    // The bodies arrive back to back: read them as a stream of JSON values.
    let answers: Vec<(String, u16)> = serde_json::Deserializer::from_str(&out)
        .into_iter::<serde_json::Value>()
        .map(|v| seen(&v.unwrap().to_string()))
        .collect();
    assert_eq!(answers.len(), 200, "200 answers");
    let ports: BTreeSet<u16> = answers.iter().map(|(_, p)| *p).collect();
    assert_eq!(ports.len(), 200, "200 distinct source ports");
    for (src, port) in &answers {
        assert_eq!(src, "192.0.2.10");
        assert!((1024..=32767).contains(port), "port {port} in range");
    }
}

#[test]
fn udp_request_response_both_families() {
    let lab = common::lab_with_agents(&[SERVER]);
    let ns = lab.server_ns(SERVER);
    let egress = env!("CARGO_BIN_EXE_egress");
    let v4 = lab
        .run(
            &ns,
            egress,
            &[
                "lab",
                "udp-probe",
                &format!("{}:{}", lab::ORIGIN_V4, lab::UDP_PORT),
            ],
        )
        .expect("UDP v4 answer");
    let (src, port) = seen(&v4);
    assert_eq!(src, "192.0.2.10");
    assert!((1024..=32767).contains(&port));
    let v6 = lab
        .run(
            &ns,
            egress,
            &[
                "lab",
                "udp-probe",
                &format!("[{}]:{}", lab::ORIGIN_V6, lab::UDP_PORT),
            ],
        )
        .expect("UDP v6 answer");
    assert_eq!(seen(&v6).0, "2001:db8:7::b");
}

#[test]
fn fifty_megabyte_download_arrives_intact() {
    let lab = common::lab_with_agents(&[SERVER]);
    const SIZE: u64 = 50 * 1024 * 1024;
    let file = lab.work_dir().join("download.bin");
    let headers = lab.work_dir().join("headers.txt");
    lab.run(
        &lab.server_ns(SERVER),
        "curl",
        &[
            "-sS",
            "--max-time",
            "60",
            "-o",
            file.to_str().unwrap(),
            "-D",
            headers.to_str().unwrap(),
            &format!("http://{}/bytes/{SIZE}", lab::ORIGIN_V4),
        ],
    )
    .expect("download completes");
    let data = std::fs::read(&file).unwrap();
    assert_eq!(data.len() as u64, SIZE, "size");
    use sha2::Digest as _;
    let got = origin::hex(&sha2::Sha256::digest(&data));
    assert_eq!(
        got,
        origin::payload_sha256(SIZE),
        "content hash matches the generator"
    );
    let headers = std::fs::read_to_string(&headers).unwrap();
    assert!(
        headers.contains(&format!("x-payload-sha256: {got}")),
        "origin's hash header matches"
    );
    let log = std::fs::read_to_string(lab.origin_log_path()).unwrap();
    assert!(
        log.contains("tcp 192.0.2.10 "),
        "origin saw the download from the pool address: {log}"
    );
}

#[test]
fn icmp_echo_leaves_from_the_pool_and_replies_come_back() {
    let lab = common::lab_with_agents(&[SERVER]);
    let ns = lab.server_ns(SERVER);
    let before = egress::stats::read(&lab.pin_dir(SERVER)).unwrap();
    lab.run(
        &ns,
        "ping",
        &[
            "-c",
            "3",
            "-i",
            "0.05",
            "-W",
            "2",
            &lab::ORIGIN_V4.to_string(),
        ],
    )
    .expect("v4 echo answered");
    lab.run(
        &ns,
        "ping",
        &[
            "-c",
            "3",
            "-i",
            "0.05",
            "-W",
            "2",
            &lab::ORIGIN_V6.to_string(),
        ],
    )
    .expect("v6 echo answered");
    let after = egress::stats::read(&lab.pin_dir(SERVER)).unwrap();
    let moved = |name: &str| {
        let get =
            |v: &[egress::stats::StatValue]| v.iter().find(|s| s.name == name).unwrap().packets;
        get(&after) - get(&before)
    };
    assert!(
        moved("snat_new") + moved("snat_established") >= 6,
        "6 requests translated"
    );
    assert!(moved("reverse_nat") >= 6, "6 replies translated back");
}
