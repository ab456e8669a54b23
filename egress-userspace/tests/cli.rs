//! The CLI's contract: `egress validate` exit codes (0 valid, 2 invalid, 1 anything else) and
//! messages naming the bad field.

mod common;

use std::process::Command;

fn validate(path: &std::path::Path) -> (Option<i32>, String) {
    let out = Command::new(common::EGRESS)
        .arg("validate")
        .arg("--config")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

#[test]
fn validate_exit_codes_and_messages() {
    let dir = std::env::temp_dir().join(format!("egress-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let default = egress::config::DEFAULT_CONFIG;
    let cases: [(&str, String, Option<i32>, &str); 5] = [
        ("valid", default.to_string(), Some(0), "valid"),
        (
            "overlap",
            default.replace("32768-65535", "30000-65535"),
            Some(2),
            "pools[0].ipv4[0].shares[1].ports",
        ),
        (
            "unknown key",
            default.replace("uplink = \"eth0\"", "uplink = \"eth0\"\nspeed = 10"),
            Some(2),
            "speed",
        ),
        (
            "bad address",
            default.replace("192.0.2.10", "192.0.2.300"),
            Some(2),
            "pools[0].ipv4[0].address",
        ),
        (
            "not toml",
            "[[servers]\n".to_string(),
            Some(2),
            "invalid config",
        ),
    ];
    for (name, text, code, says) in cases {
        let p = dir.join(format!("{}.toml", name.replace(' ', "-")));
        std::fs::write(&p, text).unwrap();
        let (got, msg) = validate(&p);
        assert_eq!(got, code, "{name}: exit code; output {msg}");
        assert!(
            msg.contains(says),
            "{name}: output should mention {says:?}: {msg}"
        );
    }
    let (got, msg) = validate(&dir.join("missing.toml"));
    assert_eq!(got, Some(1), "missing file is not 'invalid': {msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}
