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

/// Sends raw IPv4 packets (each a whole IP packet, header included, as crafted: any source,
/// TTL, protocol) from network namespace `ns`, routed there by their destination. For tests that
/// play an attacker on the internet side. Returns how many were sent.
pub fn send_ipv4(ns: &str, packets: &[Vec<u8>]) -> anyhow::Result<usize> {
    let path = format!("/run/netns/{ns}");
    let packets = packets.to_vec();
    // setns affects only the calling thread: a thread of its own enters the namespace.
    std::thread::scope(|s| {
        s.spawn(move || -> anyhow::Result<usize> {
            let ns_file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on a valid namespace fd, for this thread only.
            if unsafe {
                libc::setns(
                    std::os::fd::AsRawFd::as_raw_fd(&ns_file),
                    libc::CLONE_NEWNET,
                )
            } != 0
            {
                bail!("entering {ns}: {}", io::Error::last_os_error());
            }
            // SAFETY: plain socket call; IPPROTO_RAW implies IP_HDRINCL.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            if fd < 0 {
                bail!("raw socket in {ns}: {}", io::Error::last_os_error());
            }
            let mut sent = 0;
            for p in &packets {
                if p.len() < 20 {
                    continue;
                }
                let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                to.sin_family = libc::AF_INET as libc::sa_family_t;
                to.sin_addr.s_addr = u32::from_ne_bytes([p[16], p[17], p[18], p[19]]);
                // SAFETY: p and to are valid for the lengths given.
                let rc = unsafe {
                    libc::sendto(
                        fd,
                        p.as_ptr().cast(),
                        p.len(),
                        0,
                        (&to as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                if rc >= 0 {
                    sent += 1;
                }
            }
            // SAFETY: closing the socket opened above.
            unsafe { libc::close(fd) };
            Ok(sent)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("raw sender thread panicked"))?
    })
}
