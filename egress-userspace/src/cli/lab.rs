//! `egress lab`: build, inspect and remove the namespace lab by hand.

use std::{path::PathBuf, process::ExitCode};

use super::ConfigArg;
use crate::lab::{self, Lab, LabSpec};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Build the lab from the config and leave it running (remove it with `lab down`).
    Up {
        #[command(flatten)]
        config: ConfigArg,
        /// Also start the agent on every server.
        #[arg(long)]
        agents: bool,
        /// Also start the control network: a 3-member etcd cluster with TLS, client
        /// certificates and roles (`egress fleet init`); the config is published and the agents
        /// (with --agents) read it from etcd.
        #[arg(long)]
        fleet: bool,
    },
    /// Remove every lab namespace, process, pin and work directory, including crashed runs'.
    Down,
    /// List lab namespaces, the processes in them, and leftover directories.
    Status,
    /// Send small UDP datagrams for a while and print how many (the lab's packet generator).
    #[command(hide = true)]
    UdpFlood {
        to: std::net::SocketAddr,
        #[arg(long, default_value_t = 1)]
        flows: u16,
        #[arg(long, default_value_t = 64)]
        frame: usize,
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// Send one UDP datagram and print the answer (the lab's UDP client).
    #[command(hide = true)]
    UdpProbe {
        to: std::net::SocketAddr,
        /// Payload bytes (deterministic, see `lab::origin::payload_byte`); larger than the
        /// MTU, the datagram leaves in fragments.
        #[arg(long, default_value_t = 5)]
        size: usize,
    },
    /// Attach an XDP program that passes everything to `iface` and hold it until killed: a
    /// veth takes the frames its peer's XDP program transmits back (XDP_TX) only when it runs
    /// XDP itself. Used by the lab for servers with `--xdp`.
    #[command(hide = true)]
    XdpPass { iface: String },
    /// Run the lab's origin server (HTTP + UDP echo reporting the source seen). Used by the lab.
    #[command(hide = true)]
    Origin {
        #[arg(long)]
        log: PathBuf,
        #[arg(long, default_value_t = lab::HTTP_PORT)]
        http_port: u16,
        #[arg(long, default_value_t = lab::UDP_PORT)]
        udp_port: u16,
    },
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Up {
            config,
            agents,
            fleet,
        } => {
            let spec = LabSpec::new(config.load()?, std::env::current_exe()?);
            let mut lab = Lab::up(spec)?;
            let fleet = if fleet {
                let f = lab.start_fleet(true)?;
                let text = std::fs::read_to_string(lab.config_path())?;
                lab.publish(&text)?;
                Some(f)
            } else {
                None
            };
            if agents {
                let names: Vec<String> = lab
                    .config()
                    .servers
                    .iter()
                    .map(|s| s.name.clone())
                    .collect();
                for name in names {
                    if fleet.is_some() {
                        lab.start_fleet_agent(&name, &[])?;
                    } else {
                        lab.start_agent(&name)?;
                    }
                }
            }
            println!("lab {} is up:", lab.prefix);
            for ns in lab.namespaces() {
                println!("  {ns}");
            }
            println!("config: {}", lab.config_path().display());
            if let Some(f) = &fleet {
                println!(
                    "fleet:  ip netns exec {} egress fleet status {}",
                    f.ns,
                    f.args(crate::fleet::pki::READER_USER).join(" ")
                );
            }
            println!(
                "try:    nsenter --net=/run/netns/{} curl -s http://{}/",
                lab.server_ns(&lab.config().servers[0].name),
                lab::ORIGIN_V4
            );
            println!("remove: cargo xtask lab down");
            lab.persist();
        }
        Command::Down => {
            let gone = lab::down_leftovers()?;
            for (ns, pids) in &gone.namespaces {
                println!("removed namespace {ns} (killed {} processes)", pids.len());
            }
            for dir in &gone.dirs {
                println!("removed {}", dir.display());
            }
            if gone.namespaces.is_empty() && gone.dirs.is_empty() {
                println!("nothing to remove");
            }
        }
        Command::Status => {
            let found = lab::leftovers()?;
            if found.namespaces.is_empty() && found.dirs.is_empty() {
                println!("no lab is up");
            }
            for (ns, pids) in &found.namespaces {
                println!("namespace {ns}: pids {pids:?}");
            }
            for dir in &found.dirs {
                println!("directory {}", dir.display());
            }
        }
        Command::UdpFlood {
            to,
            flows,
            frame,
            seconds,
            cpu,
        } => {
            println!(
                "{}",
                lab::origin::udp_flood(to, flows, frame, seconds, cpu)?
            )
        }
        Command::UdpProbe { to, size } => println!("{}", lab::origin::udp_probe(to, size)?),
        Command::XdpPass { iface } => {
            let mut ebpf = crate::loader::load_unpinned(1, 1, 0, crate::loader::sent_key())?;
            let prog = crate::loader::xdp_program(&mut ebpf, egress_common::prog_names::XDP_EMPTY)?;
            prog.attach(&iface, aya::programs::XdpMode::Driver)?;
            eprintln!("xdp_empty on {iface}: ready");
            loop {
                std::thread::park();
            }
        }
        Command::Origin {
            log,
            http_port,
            udp_port,
        } => lab::origin::serve(http_port, udp_port, &log)?,
    }
    Ok(ExitCode::SUCCESS)
}
