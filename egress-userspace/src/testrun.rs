//! Running the real programs on crafted packets with BPF_PROG_TEST_RUN: the packet tests and
//! the per-packet benchmarks use this. Nothing is attached or pinned.

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{TestRun as _, TestRunOptions},
};
use egress_common::{
    fabric::Local,
    map_names, prog_names,
    stats::{Counter, Stat},
};

use crate::{
    loader::{self, LoadError, Maps},
    plan,
    validate::Topology,
};

/// TC verdicts the programs return.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Egress,
    Ingress,
}

/// The result of one run.
#[derive(Debug)]
pub struct Outcome {
    pub verdict: u32,
    pub packet: Vec<u8>,
    pub duration: std::time::Duration,
}

/// The programs loaded with their own (unpinned) maps holding one server's plan.
pub struct TestDatapath {
    ebpf: Ebpf,
    pub maps: Maps,
}

impl TestDatapath {
    /// Loads the programs and writes `server`'s plan of `topology` into the maps, with `local`
    /// as this server's fabric settings.
    pub fn new(topology: &Topology, server: &str, local: &Local) -> anyhow::Result<Self> {
        let mut ebpf = loader::load_unpinned()?;
        for (name, _) in loader::PROGRAMS {
            loader::program(&mut ebpf, name)?;
        }
        let mut maps = loader::take_maps(&mut ebpf)?;
        maps.set_local(local)?;
        let p = plan::plan(topology, server);
        maps.plan.apply(&plan::map_contents(topology, &p))?;
        Ok(Self { ebpf, maps })
    }

    /// Runs `packet` through the program of `hook` once, with skb mark `mark`.
    pub fn run(&mut self, hook: Hook, mark: u32, packet: &[u8]) -> anyhow::Result<Outcome> {
        let name = match hook {
            Hook::Egress => prog_names::TC_EGRESS,
            Hook::Ingress => prog_names::TC_INGRESS,
        };
        let prog = loader::program(&mut self.ebpf, name)?;
        // A prefix of struct __sk_buff: len, pkt_type, mark.
        let mut ctx = [0u8; 12];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        let mut out = vec![0u8; packet.len() + 512];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .map_err(|source| LoadError::Program { name, source })?;
        out.truncate(r.data_size_out as usize);
        Ok(Outcome {
            verdict: r.return_value,
            packet: out,
            duration: r.duration,
        })
    }

    /// Counter `stat` summed over CPUs (packets).
    pub fn counter(&self, stat: Stat) -> u64 {
        let map = self.ebpf.map(map_names::STATS).expect("STATS map");
        let arr: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(map).expect("STATS is a per-CPU array");
        arr.get(&(stat as u32), 0)
            .map(|v| v.iter().map(|c| c.packets).sum())
            .unwrap_or(0)
    }
}
