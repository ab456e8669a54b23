//! The lab's control network: a namespace running a real 3-member etcd cluster (Debian's
//! binary), separate from the fabric, and a management link from every server to it, so that
//! control-plane faults and fabric faults can be made independently.
//!
//! With TLS (the default), the lab sets the fleet up as an operator would: `egress fleet init
//! --certs-only` before the members start, then `egress fleet init` for users, roles and auth.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, anyhow, bail};

use super::{Lab, netns, path_str};
use crate::fleet::pki;

/// The control network: members at .1-.3 of 10.61.0.0/24, servers at 10.61.1.<n>.
const MEMBERS: usize = 3;
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

fn member_ip(i: usize) -> String {
    format!("10.61.0.{}", i + 1)
}

/// What a lab's fleet is.
#[derive(Debug, Clone)]
pub struct FleetLab {
    pub ns: String,
    pub tls: bool,
    /// The CA directory (`fleet init --ca-dir`), when TLS.
    pub ca_dir: PathBuf,
    pub urls: Vec<String>,
    pub prefix: String,
    /// The topology whose servers get identities (`fleet init --servers`).
    pub servers_file: PathBuf,
}

impl FleetLab {
    /// `--etcd … --etcd-tls …` for `identity` (an etcd user, e.g. `egress-publisher`).
    pub fn args(&self, identity: &str) -> Vec<String> {
        let mut a = vec!["--etcd".to_string(), self.urls.join(",")];
        if self.tls {
            a.push("--etcd-tls".into());
            a.push(
                pki::identity_dir(&self.ca_dir, identity)
                    .display()
                    .to_string(),
            );
        } else {
            a.push("--etcd-plaintext".into());
        }
        a
    }
}

impl Lab {
    /// Starts the control network and its etcd cluster (TLS, client certificates and roles
    /// unless `tls` is false), and plugs every server into it.
    pub fn start_fleet(&mut self, tls: bool) -> anyhow::Result<FleetLab> {
        let servers = self.config_path();
        self.start_fleet_with(tls, servers)
    }

    /// [`Lab::start_fleet`] with identities for the servers of another topology (one with
    /// more servers than the lab has namespaces: `--no-dataplane` agents).
    pub fn start_fleet_with(
        &mut self,
        tls: bool,
        servers_file: PathBuf,
    ) -> anyhow::Result<FleetLab> {
        let installed = std::process::Command::new("etcd")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            bail!("etcd is not installed (Debian's etcd-server; `cargo xtask setup` installs it)");
        }
        let ns = self.add_ns("ctl")?;
        netns::ip_in(&ns, &["link", "add", "mgmt", "type", "bridge"])?;
        netns::ip_in(&ns, &["link", "set", "mgmt", "up"])?;
        for i in 0..MEMBERS {
            self.address(&ns, "mgmt", &format!("{}/16", member_ip(i)))?;
        }
        let servers: Vec<String> = self.config.servers.iter().map(|s| s.name.clone()).collect();
        for (n, server) in servers.iter().enumerate() {
            let sns = self.server_ns(server);
            let port = format!("m-{n}");
            netns::ip_in(
                &ns,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "mgmt0", "netns", &sns,
                ],
            )?;
            netns::ip_in(&ns, &["link", "set", &port, "master", "mgmt", "up"])?;
            netns::ip_in(&sns, &["link", "set", "mgmt0", "up"])?;
            self.address(&sns, "mgmt0", &format!("10.61.1.{}/16", n + 1))?;
        }
        let scheme = if tls { "https" } else { "http" };
        let urls: Vec<String> = (0..MEMBERS)
            .map(|i| format!("{scheme}://{}:{CLIENT_PORT}", member_ip(i)))
            .collect();
        let fleet = FleetLab {
            ns: ns.clone(),
            tls,
            ca_dir: self.work_dir.join("fleet-ca"),
            urls,
            prefix: crate::fleet::DEFAULT_PREFIX.to_string(),
            servers_file,
        };
        if tls {
            self.fleet_init(&fleet, true)?;
        }
        for i in 0..MEMBERS {
            self.start_member(&fleet, i)?;
        }
        for i in 0..MEMBERS {
            self.wait_for_log(
                &member_label(i),
                0,
                &["ready to serve client requests"],
                Duration::from_secs(30),
            )?;
        }
        if tls {
            self.fleet_init(&fleet, false)?;
        }
        self.fleet = Some(fleet.clone());
        Ok(fleet)
    }

    /// `egress fleet init` from the control namespace.
    pub fn fleet_init(&self, fleet: &FleetLab, certs_only: bool) -> anyhow::Result<String> {
        let mut args = vec![
            "fleet".to_string(),
            "init".into(),
            "--etcd".into(),
            fleet.urls.join(","),
            "--ca-dir".into(),
            fleet.ca_dir.display().to_string(),
            "--servers".into(),
            fleet.servers_file.display().to_string(),
        ];
        if certs_only {
            args.push("--certs-only".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&fleet.ns, path_str(&self.egress_bin)?, &args)
    }

    /// Starts member `i` (again, after [`Lab::stop_member`]: its data directory is kept).
    pub fn start_member(&mut self, fleet: &FleetLab, i: usize) -> anyhow::Result<()> {
        let scheme = if fleet.tls { "https" } else { "http" };
        let ip = member_ip(i);
        let cluster: Vec<String> = (0..MEMBERS)
            .map(|m| format!("m{m}={scheme}://{}:{PEER_PORT}", member_ip(m)))
            .collect();
        let data = self.work_dir.join(format!("etcd-m{i}"));
        let mut args = vec![
            format!("--name=m{i}"),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls={scheme}://{ip}:{CLIENT_PORT}"),
            format!("--advertise-client-urls={scheme}://{ip}:{CLIENT_PORT}"),
            format!("--listen-peer-urls={scheme}://{ip}:{PEER_PORT}"),
            format!("--initial-advertise-peer-urls={scheme}://{ip}:{PEER_PORT}"),
            format!("--initial-cluster={}", cluster.join(",")),
            format!("--initial-cluster-token={}", self.prefix),
            "--initial-cluster-state=new".into(),
            // A data center's tuning (heartbeat about the round trip, election timeout six of
            // them): etcd's smallest lease is 1.5 election timeouts rounded up, so 1 s here
            // (2 s with etcd's defaults), what the agents' 1 s leases need.
            "--heartbeat-interval=100".into(),
            "--election-timeout=600".into(),
            // Nothing but the lab's own addresses: no metrics or debug listeners elsewhere.
            format!("--listen-metrics-urls=http://{ip}:{}", 2381),
        ];
        if fleet.tls {
            let member = fleet.ca_dir.join(pki::MEMBER_DIR);
            let ca = fleet.ca_dir.join(crate::fleet::tls::CA_FILE);
            let cert = member.join(pki::MEMBER_CERT);
            let key = member.join(pki::MEMBER_KEY);
            for (flag, path) in [
                ("--trusted-ca-file", &ca),
                ("--cert-file", &cert),
                ("--key-file", &key),
                ("--peer-trusted-ca-file", &ca),
                ("--peer-cert-file", &cert),
                ("--peer-key-file", &key),
            ] {
                args.push(format!("{flag}={}", path.display()));
            }
            args.push("--client-cert-auth".into());
            args.push("--peer-client-cert-auth".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let label = member_label(i);
        let _ = std::fs::remove_file(self.log_path(&label));
        self.spawn(&label, &fleet.ns, "etcd", &args)
    }

    /// Stops member `i` (SIGTERM).
    pub fn stop_member(&mut self, i: usize) -> anyhow::Result<()> {
        self.stop(&member_label(i)).map(drop)
    }

    /// Stops members `which` at once (all signalled before any is waited for): a whole
    /// cluster going away, with no window in which some agents still reach a leader.
    pub fn stop_members(&mut self, which: &[usize]) -> anyhow::Result<()> {
        let labels: Vec<String> = which.iter().map(|&i| member_label(i)).collect();
        let (stopping, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.procs)
            .into_iter()
            .partition(|p| labels.contains(&p.label));
        self.procs = kept;
        let found = stopping.len();
        super::terminate_all(stopping);
        if found != labels.len() {
            bail!("not every member of {which:?} was running");
        }
        Ok(())
    }

    /// Waits until member `i` serves clients again.
    pub fn wait_member(&self, i: usize) -> anyhow::Result<()> {
        self.wait_for_log(
            &member_label(i),
            0,
            &["ready to serve client requests"],
            Duration::from_secs(30),
        )
        .map(drop)
    }

    /// The lab's fleet (after [`Lab::start_fleet`]).
    pub fn fleet(&self) -> anyhow::Result<&FleetLab> {
        self.fleet
            .as_ref()
            .ok_or_else(|| anyhow!("the lab has no fleet (Lab::start_fleet)"))
    }

    /// Starts the agent of `server` in fleet mode (its own identity) and waits until it is
    /// ready (a published topology applied).
    pub fn start_fleet_agent(&mut self, server: &str, extra: &[&str]) -> anyhow::Result<()> {
        let fleet = self.fleet()?.clone();
        let mut cmd = netns::command_in(&self.server_ns(server), path_str(&self.egress_bin)?);
        cmd.arg("agent")
            .args(fleet.args(&pki::agent_user(server)))
            .args(["--server", server, "--pin-dir"])
            .arg(self.pin_dir(server))
            .args(extra);
        self.spawn_until_ready(&format!("agent-{server}"), cmd)
    }

    /// Runs `egress fleet …` as `identity` from the control namespace; returns its output
    /// (stdout, or the error with its stderr).
    pub fn fleet_cmd(&self, identity: &str, args: &[&str]) -> anyhow::Result<String> {
        let fleet = self.fleet()?;
        let (sub, rest) = args.split_first().context("a fleet subcommand")?;
        let mut all: Vec<String> = vec!["fleet".into(), sub.to_string()];
        all.extend(fleet.args(identity));
        all.extend(rest.iter().map(|s| s.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.run(&fleet.ns, path_str(&self.egress_bin)?, &all)
    }

    /// Runs Debian's `etcdctl` (v3) from the control namespace as `identity` (None: no
    /// client certificate): another client of the same etcd, as an operator's script would be.
    pub fn etcdctl(
        &self,
        identity: Option<&str>,
        args: &[&str],
    ) -> anyhow::Result<std::process::Output> {
        let fleet = self.fleet()?;
        let mut cmd = netns::command_in(&fleet.ns, "etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", fleet.urls.join(",")))
            .arg("--dial-timeout=3s")
            .arg("--command-timeout=5s");
        if fleet.tls {
            cmd.arg(format!(
                "--cacert={}",
                fleet.ca_dir.join(crate::fleet::tls::CA_FILE).display()
            ));
        }
        if let Some(id) = identity {
            let dir = pki::identity_dir(&fleet.ca_dir, id);
            cmd.arg(format!(
                "--cert={}",
                dir.join(crate::fleet::tls::CERT_FILE).display()
            ))
            .arg(format!(
                "--key={}",
                dir.join(crate::fleet::tls::KEY_FILE).display()
            ));
        }
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .context("running etcdctl (Debian's etcd-client)")
    }

    /// Publishes `text` as the publisher; returns the new revision.
    pub fn publish(&self, text: &str) -> anyhow::Result<i64> {
        let file = self.work_dir.join("publish.toml");
        std::fs::write(&file, text)?;
        let out = self.fleet_cmd(
            pki::PUBLISHER_USER,
            &["publish", "--config", path_str(&file)?],
        )?;
        published_revision(&out).with_context(|| format!("publish said: {out}"))
    }

    /// Takes a server's management link down or up (a control-plane fault only).
    pub fn set_mgmt_link(&self, server: &str, up: bool) -> anyhow::Result<()> {
        netns::ip_in(
            &self.server_ns(server),
            &["link", "set", "mgmt0", if up { "up" } else { "down" }],
        )
        .map(drop)
    }

    pub fn work_path(&self, name: &str) -> PathBuf {
        self.work_dir.join(name)
    }
}

fn member_label(i: usize) -> String {
    format!("etcd-m{i}")
}

/// The revision in `egress fleet publish`'s answer.
pub fn published_revision(out: &str) -> Option<i64> {
    out.split("as revision ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
