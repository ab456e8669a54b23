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

/// Runs `f` on a thread of its own inside network namespace `ns` (setns affects only the
/// calling thread).
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(move || -> anyhow::Result<T> {
            let ns_file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&ns_file);
            // SAFETY: setns on a valid namespace fd, for this thread only.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                bail!("entering {path}: {}", io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
    })
}

/// Sends raw IPv4 packets (each a whole IP packet, header included, as crafted: any source,
/// TTL, protocol) from network namespace `ns`, routed there by their destination. For tests that
/// play an attacker on the internet side. Returns how many were sent.
pub fn send_ipv4(ns: &str, packets: &[Vec<u8>]) -> anyhow::Result<usize> {
    in_ns(ns, || {
        // SAFETY: plain socket call; IPPROTO_RAW implies IP_HDRINCL.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            bail!("raw socket in {ns}: {}", io::Error::last_os_error());
        }
        let mut sent = 0;
        for p in packets.iter().filter(|p| p.len() >= 20) {
            // SAFETY: an all-zero sockaddr_in is valid.
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
            sent += usize::from(rc >= 0);
        }
        // SAFETY: closing the socket opened above.
        unsafe { libc::close(fd) };
        Ok(sent)
    })
}

/// IFLA_GSO_IPV4_MAX_SIZE and IFLA_GRO_IPV4_MAX_SIZE (Linux 6.3+; iproute2 before 6.3 cannot
/// set them, and the plain gso/gro_max_size leave IPv4 at 64 KiB).
const IFLA_GSO_IPV4_MAX_SIZE: u16 = 63;
const IFLA_GRO_IPV4_MAX_SIZE: u16 = 64;

/// Lets interface `ifname` of `ns` carry IPv4 GSO/GRO packets of up to `size` bytes (IPv4 BIG
/// TCP), through rtnetlink.
pub fn set_ipv4_big_tcp(ns: &str, ifname: &str, size: u32) -> anyhow::Result<()> {
    in_ns(ns, || {
        let name = CString::new(ifname)?;
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            bail!("no interface {ifname} in {ns}");
        }
        // nlmsghdr (16) + ifinfomsg (16) + two u32 attributes (8 each).
        let mut msg = Vec::with_capacity(48);
        msg.extend_from_slice(&48u32.to_ne_bytes());
        msg.extend_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
        msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        msg.extend_from_slice(&(index as i32).to_ne_bytes());
        msg.extend_from_slice(&[0; 8]); // flags, change mask
        for attr in [IFLA_GSO_IPV4_MAX_SIZE, IFLA_GRO_IPV4_MAX_SIZE] {
            msg.extend_from_slice(&8u16.to_ne_bytes());
            msg.extend_from_slice(&attr.to_ne_bytes());
            msg.extend_from_slice(&size.to_ne_bytes());
        }
        // SAFETY: plain socket calls on a buffer of the given lengths.
        unsafe {
            let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                bail!("netlink socket: {}", io::Error::last_os_error());
            }
            let sent = libc::send(fd, msg.as_ptr().cast(), msg.len(), 0);
            let mut ack = [0u8; 256];
            let got = libc::recv(fd, ack.as_mut_ptr().cast(), ack.len(), 0);
            libc::close(fd);
            if sent < 0 || got < 20 {
                bail!("rtnetlink on {ifname}: {}", io::Error::last_os_error());
            }
            // NLMSG_ERROR: the error code follows the header; 0 is the ack.
            let err = i32::from_ne_bytes([ack[16], ack[17], ack[18], ack[19]]);
            if err != 0 {
                bail!(
                    "setting IPv4 GSO/GRO size of {ifname} in {ns}: {}",
                    io::Error::from_raw_os_error(-err)
                );
            }
        }
        Ok(())
    })
}
