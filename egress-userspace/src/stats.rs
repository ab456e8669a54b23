//! Reading the datapath's counters from the pinned `STATS` map.

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuArray};
use egress_common::{
    map_names,
    stats::{Counter, Stat},
};

/// One counter summed over all CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StatValue {
    pub name: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error(
        "cannot open pinned map {path}: {source} (is an agent running or has one run with this pin directory?)"
    )]
    Open {
        path: String,
        source: aya::maps::MapError,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: aya::maps::MapError,
    },
}

/// Counter `stat` summed over CPUs: the one place per-CPU slots are added up.
pub fn total<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, Counter>,
    stat: Stat,
) -> Result<Counter, aya::maps::MapError> {
    Ok(map
        .get(&(stat as u32), 0)?
        .iter()
        .fold(Counter::default(), |a, c| Counter {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        }))
}

/// Reads every counter from the `STATS` map pinned in `pin_dir`.
pub fn read(pin_dir: &Path) -> Result<Vec<StatValue>, StatsError> {
    let path = pin_dir.join(map_names::STATS);
    let shown = path.display().to_string();
    let data = MapData::from_pin(&path).map_err(|source| StatsError::Open {
        path: shown.clone(),
        source,
    })?;
    let map: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(|source| StatsError::Open {
            path: shown.clone(),
            source,
        })?;
    Stat::ALL
        .iter()
        .map(|&stat| {
            let c = total(&map, stat).map_err(|source| StatsError::Read {
                path: shown.clone(),
                source,
            })?;
            Ok(StatValue {
                name: stat.name(),
                packets: c.packets,
                bytes: c.bytes,
            })
        })
        .collect()
}
