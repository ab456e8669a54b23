//! Small helpers around `ip` and around running a process inside a named network namespace.

use std::{
    ffi::CString,
    io,
    os::unix::process::CommandExt as _,
    process::{Command, Output},
};

use anyhow::{Context as _, bail};

/// Runs `ip ARGS` and fails with its stderr when it fails.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    check(&format!("ip {}", args.join(" ")), out)
}

/// Runs `ip -n NS ARGS`.
pub fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Turns a finished process into its stdout, or an error naming the command and its stderr.
pub fn check(what: &str, out: Output) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command that runs in network namespace `ns` (only the network namespace: mounts, and so
/// the host's bpffs, stay visible, unlike `ip netns exec`).
pub fn command_in(ns: &str, program: &str) -> Command {
    let path = CString::new(format!("/run/netns/{ns}")).expect("namespace name without NUL");
    let mut cmd = Command::new(program);
    // SAFETY: the closure only makes async-signal-safe syscalls (open, setns, close) and
    // allocates nothing: `path` was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let rc = libc::setns(fd, libc::CLONE_NEWNET);
            libc::close(fd);
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Every network namespace whose name starts with `prefix`.
pub fn list(prefix: &str) -> anyhow::Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect())
}

/// Pids of the processes living in namespace `ns`.
pub fn pids(ns: &str) -> Vec<i32> {
    ip(&["netns", "pids", ns])
        .map(|out| out.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Sends `sig` to `pid`; a process that is already gone is not an error.
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill has no memory preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}
