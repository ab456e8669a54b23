//! The agent's refusals: each failure gets a clear message naming what is wrong, never a panic.

mod common;

use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(common::EGRESS)
        .arg("agent")
        .args(args)
        .output()
        .unwrap()
}

fn write_config(dir: &std::path::Path, uplink: &str) -> std::path::PathBuf {
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        format!(
            "server = \"x\"\n[[locations]]\nname = \"l\"\nlatitude = 0.0\nlongitude = 0.0\n[[datacenters]]\nname = \"d\"\nlocation = \"l\"\n[[servers]]\nname = \"x\"\nid = 1\ndatacenter = \"d\"\nfabric = \"10.50.0.1\"\nuplink = \"{uplink}\"\n"
        ),
    )
    .unwrap();
    path
}

fn assert_fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(
        err.contains(needle),
        "stderr should mention {needle:?}: {err}"
    );
    assert!(!err.contains("panicked"), "panicked: {err}");
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("egress-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn missing_config_file() {
    let out = agent(&["--config", "/nonexistent/egress.toml"]);
    assert_fails_with(&out, "cannot read config /nonexistent/egress.toml");
}

#[test]
fn unparsable_config_file() {
    let d = tempdir("unparsable");
    let p = d.join("bad.toml");
    std::fs::write(&p, "[[servers]\nname=").unwrap();
    let out = agent(&["--config", p.to_str().unwrap()]);
    std::fs::remove_dir_all(&d).unwrap();
    assert_fails_with(&out, "cannot parse config");
}

#[test]
fn missing_interface() {
    common::require_root();
    let d = tempdir("noiface");
    let p = write_config(&d, "egr-none0");
    let out = agent(&["--config", p.to_str().unwrap()]);
    std::fs::remove_dir_all(&d).unwrap();
    assert_fails_with(&out, "interface \"egr-none0\" does not exist");
}

#[test]
fn pin_dir_not_on_bpffs() {
    common::require_root();
    // A namespace of its own with an uplink `up0`: the check needs an interface that exists,
    // and the host's own must never be named.
    let _net = egress::testrun::TestNet::enter();
    let d = tempdir("nobpffs");
    let p = write_config(&d, "up0");
    let out = agent(&[
        "--config",
        p.to_str().unwrap(),
        "--pin-dir",
        d.join("pins").to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&d).unwrap();
    assert_fails_with(&out, "is not on a bpf filesystem");
}

#[test]
fn fabric_address_not_on_this_host() {
    common::require_root();
    // The test namespace's uplink `up0` has 10.50.0.11; the config's server has 10.50.0.1.
    let _net = egress::testrun::TestNet::enter();
    let d = tempdir("notlocal");
    let p = write_config(&d, "up0");
    let pins = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/egress-test-notlocal-{}",
        std::process::id()
    ));
    let out = agent(&[
        "--config",
        p.to_str().unwrap(),
        "--pin-dir",
        pins.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&d).unwrap();
    let pinned = pins.exists();
    let _ = std::fs::remove_dir_all(&pins);
    assert_fails_with(
        &out,
        "10.50.0.1 (the fabric address of server \"x\" in the config) is not an address of this host",
    );
    assert!(!pinned, "nothing pinned");
}

#[test]
fn not_root() {
    common::require_root();
    let d = tempdir("notroot");
    let p = write_config(&d, "up0");
    std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            common::EGRESS,
            "agent",
            "--config",
        ])
        .arg(&p)
        .output()
        .expect("setpriv (util-linux)");
    std::fs::remove_dir_all(&d).unwrap();
    assert_fails_with(&out, "must run as root");
}

#[test]
fn invalid_config_names_the_field() {
    let d = tempdir("invalid");
    let p = write_config(&d, "up0");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("id = 1", "id = 0");
    std::fs::write(&p, text).unwrap();
    let out = agent(&["--config", p.to_str().unwrap()]);
    std::fs::remove_dir_all(&d).unwrap();
    assert_fails_with(&out, "servers[0].id: 0 is outside 1..=65535");
}

#[test]
fn unknown_server() {
    let d = tempdir("unknownserver");
    let p = write_config(&d, "up0");
    let out = agent(&["--config", p.to_str().unwrap(), "--server", "nope"]);
    std::fs::remove_dir_all(&d).unwrap();
    assert_fails_with(&out, "server \"nope\" is not in the config");
}

/// Runs `egress ARGS`, failing the test if it does not finish within 10 s (a reader blocked on a
/// FIFO would hang forever).
fn egress_bounded(args: &[&str]) -> Output {
    let mut child = Command::new(common::EGRESS)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("egress {args:?} did not finish in 10 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_config_path_that_is_not_a_regular_file_is_refused_without_blocking() {
    let d = tempdir("not-regular");
    let fifo = d.join("fifo.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for path in [fifo.to_str().unwrap(), "/dev/zero"] {
        for cmd in ["agent", "validate"] {
            let out = egress_bounded(&[cmd, "--config", path]);
            assert_fails_with(
                &out,
                &format!("cannot read config {path}: not a regular file"),
            );
        }
    }
    // Not UTF-8: an invalid config (exit 2 from validate), named as such.
    let binary = d.join("binary.toml");
    std::fs::write(&binary, b"server = \"\xff\"\n").unwrap();
    let out = egress_bounded(&["validate", "--config", binary.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not UTF-8 text (byte 10)"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A reader that goes away (`| head -1`) never makes a command panic: validate keeps its exit
/// code, a one-shot report ends quietly on SIGPIPE.
#[test]
fn a_closed_pipe_is_not_a_panic() {
    use std::os::unix::process::ExitStatusExt as _;
    let d = tempdir("pipe");
    let bad = d.join("bad.toml");
    let servers: String = (1..=40)
        .map(|i| format!("[[servers]]\nname = \"s{i}\"\nid = {i}\ndatacenter = \"x\"\nfabric = \"10.50.0.{i}\"\nuplink = \"eth0\"\n"))
        .collect();
    std::fs::write(&bad, servers).unwrap();
    let err_log = d.join("stderr");
    for (args, closed_is_stdout) in [
        (vec!["validate", "--config", bad.to_str().unwrap()], false),
        (vec!["plan", "--server", "fra-a-1"], true),
    ] {
        let mut cmd = Command::new(common::EGRESS);
        cmd.args(&args);
        if closed_is_stdout {
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::fs::File::create(&err_log).unwrap());
        } else {
            cmd.stderr(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null());
        }
        let mut child = cmd.spawn().unwrap();
        // The reader is gone before anything is written.
        drop(child.stdout.take());
        drop(child.stderr.take());
        let status = child.wait().unwrap();
        if closed_is_stdout {
            assert!(
                status.success() || status.signal() == Some(libc::SIGPIPE),
                "{args:?}: {status:?}"
            );
            let err = std::fs::read_to_string(&err_log).unwrap();
            assert!(!err.contains("panicked"), "{args:?}: {err}");
        } else {
            assert_eq!(status.code(), Some(2), "{args:?}: still invalid");
        }
    }
    std::fs::remove_dir_all(&d).unwrap();
}
