//! Writing a plan to the maps as one switch: the new plan goes into the generation not in force
//! (as a difference against what that generation holds, normally nothing), then one update of
//! `GENERATION` puts it in force, then the old generation is removed. A program reads the
//! generation once per decision, so no packet ever sees a mix of two plans; flows are never
//! touched. (Within a generation, the order still puts actions in before the policies that use
//! them, for a generation a crashed agent left half-written.)

use std::collections::BTreeMap;

use aya::{
    Pod,
    maps::{
        HashMap, MapData, MapError,
        lpm_trie::{Key, LpmTrie},
    },
};

use crate::plan::MapContents;

/// A key-value table: a BPF map, or a BTreeMap in tests.
pub trait Table<K, V> {
    fn entries(&self) -> Result<BTreeMap<K, V>, MapError>;
    /// The entries whose key `keep` takes (one generation of a plan table, say).
    fn entries_where(&self, keep: &dyn Fn(&K) -> bool) -> Result<BTreeMap<K, V>, MapError>
    where
        K: Ord,
    {
        let mut all = self.entries()?;
        all.retain(|k, _| keep(k));
        Ok(all)
    }
    fn put(&mut self, k: &K, v: &V) -> Result<(), MapError>;
    fn delete(&mut self, k: &K) -> Result<(), MapError>;
}

impl<K: Ord + Clone, V: Clone> Table<K, V> for BTreeMap<K, V> {
    fn entries(&self) -> Result<BTreeMap<K, V>, MapError> {
        Ok(self.clone())
    }
    fn put(&mut self, k: &K, v: &V) -> Result<(), MapError> {
        self.insert(k.clone(), v.clone());
        Ok(())
    }
    fn delete(&mut self, k: &K) -> Result<(), MapError> {
        self.remove(k);
        Ok(())
    }
}

impl<K: Pod + Ord, V: Pod> Table<K, V> for HashMap<MapData, K, V> {
    fn entries(&self) -> Result<BTreeMap<K, V>, MapError> {
        self.iter().collect()
    }
    fn put(&mut self, k: &K, v: &V) -> Result<(), MapError> {
        self.insert(k, v, 0)
    }
    fn delete(&mut self, k: &K) -> Result<(), MapError> {
        self.remove(k)
    }
}

/// LPM tries are keyed by (prefix length, data).
impl<K: Pod + Ord, V: Pod> Table<(u32, K), V> for LpmTrie<MapData, K, V> {
    fn entries(&self) -> Result<BTreeMap<(u32, K), V>, MapError> {
        self.iter()
            .map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
            .collect()
    }
    fn put(&mut self, k: &(u32, K), v: &V) -> Result<(), MapError> {
        self.insert(&Key::new(k.0, k.1), v, 0)
    }
    fn delete(&mut self, k: &(u32, K)) -> Result<(), MapError> {
        self.remove(&Key::new(k.0, k.1))
    }
}

/// Entries added, updated and removed by one apply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

impl std::ops::AddAssign for Diff {
    fn add_assign(&mut self, o: Diff) {
        self.added += o.added;
        self.updated += o.updated;
        self.removed += o.removed;
    }
}

/// Puts every desired entry that is missing or different.
pub fn upsert<K: Ord, V: PartialEq>(
    t: &mut impl Table<K, V>,
    desired: &BTreeMap<K, V>,
) -> Result<Diff, MapError> {
    let current = t.entries()?;
    let mut d = Diff::default();
    for (k, v) in desired {
        match current.get(k) {
            Some(cur) if cur == v => {}
            Some(_) => {
                t.put(k, v)?;
                d.updated += 1;
            }
            None => {
                t.put(k, v)?;
                d.added += 1;
            }
        }
    }
    Ok(d)
}

/// Deletes every entry that is not desired.
pub fn prune<K: Ord, V>(
    t: &mut impl Table<K, V>,
    desired: &BTreeMap<K, V>,
) -> Result<Diff, MapError> {
    let mut d = Diff::default();
    for k in t.entries()?.keys().filter(|k| !desired.contains_key(k)) {
        t.delete(k)?;
        d.removed += 1;
    }
    Ok(d)
}

/// A table read once, then answered from a copy that follows the writes made through it. A
/// plan write reads each table four or five times (the change, what to prune, what to upsert,
/// then the old generation to remove, or what a failure takes back), and a BPF map's every
/// read costs two syscalls per entry: over a table of half a million entries, seconds.
pub struct ReadOnce<'a, T, K, V> {
    table: &'a mut T,
    copy: BTreeMap<K, V>,
}

impl<'a, K, V, T: Table<K, V>> ReadOnce<'a, T, K, V> {
    pub fn new(table: &'a mut T) -> Result<Self, MapError> {
        let copy = table.entries()?;
        Ok(Self { table, copy })
    }
}

impl<K: Ord + Clone, V: Clone, T: Table<K, V>> Table<K, V> for ReadOnce<'_, T, K, V> {
    fn entries(&self) -> Result<BTreeMap<K, V>, MapError> {
        Ok(self.copy.clone())
    }
    /// Copies only what is asked for: a plan write reads one generation at a time, and the
    /// copy of a full table holds both during a switch.
    fn entries_where(&self, keep: &dyn Fn(&K) -> bool) -> Result<BTreeMap<K, V>, MapError>
    where
        K: Ord,
    {
        Ok(self
            .copy
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
    fn put(&mut self, k: &K, v: &V) -> Result<(), MapError> {
        self.table.put(k, v)?;
        self.copy.insert(k.clone(), v.clone());
        Ok(())
    }
    fn delete(&mut self, k: &K) -> Result<(), MapError> {
        self.table.delete(k)?;
        self.copy.remove(k);
        Ok(())
    }
}

/// A plan map key that carries a generation (see `egress_common::generation`).
pub trait Generational: Clone {
    fn generation(&self) -> u8;
    fn in_generation(self, g: u8) -> Self;
}

impl Generational for egress_common::action::ActionKey {
    fn generation(&self) -> u8 {
        self.gen_ as u8
    }
    fn in_generation(mut self, g: u8) -> Self {
        self.gen_ = u32::from(g);
        self
    }
}

impl Generational for egress_common::fabric::AddrKey {
    fn generation(&self) -> u8 {
        self.gen_
    }
    fn in_generation(mut self, g: u8) -> Self {
        self.gen_ = g;
        self
    }
}

macro_rules! generational_lpm {
    ($t:ty) => {
        impl Generational for (u32, $t) {
            fn generation(&self) -> u8 {
                u32::from_be(self.1.gen_be) as u8
            }
            fn in_generation(mut self, g: u8) -> Self {
                self.1.gen_be = u32::from(g).to_be();
                self
            }
        }
    };
}
generational_lpm!(egress_common::policy::PolicyKeyV4);
generational_lpm!(egress_common::policy::PolicyKeyV6);
generational_lpm!(egress_common::policy::PeerPolicyKey);

/// One generation of a plan table, seen with generation-0 keys (as plans are computed).
pub struct InGeneration<'a, T> {
    pub table: &'a mut T,
    pub generation: u8,
}

impl<K: Generational + Ord, V, T: Table<K, V>> Table<K, V> for InGeneration<'_, T> {
    fn entries(&self) -> Result<BTreeMap<K, V>, MapError> {
        Ok(self
            .table
            .entries_where(&|k| k.generation() == self.generation)?
            .into_iter()
            .map(|(k, v)| (k.in_generation(0), v))
            .collect())
    }
    fn put(&mut self, k: &K, v: &V) -> Result<(), MapError> {
        self.table.put(&k.clone().in_generation(self.generation), v)
    }
    fn delete(&mut self, k: &K) -> Result<(), MapError> {
        self.table.delete(&k.clone().in_generation(self.generation))
    }
}

/// The one-entry `GENERATION` map: which generation is in force.
pub trait GenerationCell {
    fn get(&self) -> Result<u8, MapError>;
    fn set(&mut self, g: u8) -> Result<(), MapError>;
    /// Returns once every program run that may have read the generation before the last
    /// `set` has ended.
    fn quiesce(&self) {}
}

impl<G: GenerationCell> GenerationCell for &mut G {
    fn get(&self) -> Result<u8, MapError> {
        (**self).get()
    }
    fn set(&mut self, g: u8) -> Result<(), MapError> {
        (**self).set(g)
    }
    fn quiesce(&self) {
        (**self).quiesce()
    }
}

impl GenerationCell for u8 {
    fn get(&self) -> Result<u8, MapError> {
        Ok(*self)
    }
    fn set(&mut self, g: u8) -> Result<(), MapError> {
        *self = g;
        Ok(())
    }
}

impl GenerationCell for aya::maps::Array<MapData, u32> {
    fn get(&self) -> Result<u8, MapError> {
        Ok((aya::maps::Array::get(self, &0, 0)? & 1) as u8)
    }
    fn set(&mut self, g: u8) -> Result<(), MapError> {
        aya::maps::Array::set(self, 0, u32::from(g), 0)
    }
    fn quiesce(&self) {
        // BPF programs run inside RCU read-side sections: membarrier(GLOBAL) returns after an
        // RCU grace period (synchronize_rcu), i.e. after every run that began before it.
        const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
        // SAFETY: a syscall with integer arguments only.
        let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
        if rc != 0 {
            // Refused (nohz_full kernels): a program run lasts microseconds; wait far longer.
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// The agent's plan tables.
pub struct PlanTables<A, P4, P6, PE, OW, PP, G, F> {
    pub actions: A,
    pub policies_v4: P4,
    pub policies_v6: P6,
    pub peers: PE,
    pub owners: OW,
    pub peer_policies: PP,
    pub generation: G,
    /// The pass filter: each plan's buckets are admitted before it goes in force.
    pub filter: F,
}

/// Runs `body` for every plan table seen in generation `g`, with `w` the same table of
/// `want`, in the order peers, owners, what peers may use, actions, policies; sums the diffs.
macro_rules! each_in {
    ($self:ident, $g:expr, $want:expr, |$t:ident, $w:ident| $body:expr) => {{
        let mut d = Diff::default();
        {
            let $t = &mut InGeneration {
                table: &mut $self.peers,
                generation: $g,
            };
            let $w = &($want).peers;
            d += $body;
        }
        {
            let $t = &mut InGeneration {
                table: &mut $self.owners,
                generation: $g,
            };
            let $w = &($want).owners;
            d += $body;
        }
        {
            let $t = &mut InGeneration {
                table: &mut $self.peer_policies,
                generation: $g,
            };
            let $w = &($want).peer_policies;
            d += $body;
        }
        {
            let $t = &mut InGeneration {
                table: &mut $self.actions,
                generation: $g,
            };
            let $w = &($want).actions;
            d += $body;
        }
        {
            let $t = &mut InGeneration {
                table: &mut $self.policies_v4,
                generation: $g,
            };
            let $w = &($want).policies_v4;
            d += $body;
        }
        {
            let $t = &mut InGeneration {
                table: &mut $self.policies_v6,
                generation: $g,
            };
            let $w = &($want).policies_v6;
            d += $body;
        }
        d
    }};
}

impl<A, P4, P6, PE, OW, PP, G, F> PlanTables<A, P4, P6, PE, OW, PP, G, F>
where
    A: Table<egress_common::action::ActionKey, egress_common::action::Action>,
    P4: Table<crate::plan::LpmKeyV4, egress_common::policy::PolicyValue>,
    P6: Table<crate::plan::LpmKeyV6, egress_common::policy::PolicyValue>,
    PE: Table<egress_common::fabric::AddrKey, egress_common::fabric::Peer>,
    OW: Table<egress_common::fabric::AddrKey, egress_common::fabric::Owners>,
    PP: Table<crate::plan::LpmKeyPeer, egress_common::policy::PolicyValue>,
    G: GenerationCell,
    F: crate::filter::FilterCell,
{
    /// Puts `want` in force in one switch: written into the generation not in force, switched
    /// to with one update, the old generation then removed. Returns the difference between the
    /// old plan and the new (what a packet sees change), not the writes made. Each table is
    /// read once (the agent is its only writer).
    pub fn apply(&mut self, want: &MapContents) -> Result<Diff, MapError> {
        PlanTables {
            actions: ReadOnce::new(&mut self.actions)?,
            policies_v4: ReadOnce::new(&mut self.policies_v4)?,
            policies_v6: ReadOnce::new(&mut self.policies_v6)?,
            peers: ReadOnce::new(&mut self.peers)?,
            owners: ReadOnce::new(&mut self.owners)?,
            peer_policies: ReadOnce::new(&mut self.peer_policies)?,
            generation: &mut self.generation,
            filter: &mut self.filter,
        }
        .switch(want)
    }

    /// [`PlanTables::apply`] on tables as given.
    fn switch(&mut self, want: &MapContents) -> Result<Diff, MapError> {
        let current = self.generation.get()?;
        let next = egress_common::generation::next(current);
        // What changes for a packet: the new plan against the one in force.
        let change = each_in!(self, current, want, |t, w| diff_of(&t.entries()?, w));
        // The next generation is not read by any packet: first what a crashed agent may have
        // left there goes (so the maps never hold more than the plan in force and `want`),
        // then `want` is written.
        let written = (|| {
            // Before the switch: the new plan's destinations must not pass early (the old
            // plan's stay admitted; a collection pass narrows the filter later).
            self.filter.admit(&crate::filter::Buckets::of_plan(want))?;
            each_in!(self, next, want, |t, w| prune(t, w)?);
            each_in!(self, next, want, |t, w| upsert(t, w)?);
            self.generation.set(next)
        })();
        if let Err(e) = written {
            // Not switched: the plan in force is untouched; what was written goes again.
            let empty = MapContents::default();
            let _ = (|| -> Result<Diff, MapError> {
                Ok(each_in!(self, next, empty, |t, w| prune(t, w)?))
            })();
            return Err(e);
        }
        // A program that read the old generation just before the switch may still be running:
        // its lookups must find their entries. Removing them waits until every such run ends.
        self.generation.quiesce();
        let empty = MapContents::default();
        // Switched: a failure here leaves old entries no packet reads, and the next apply
        // removes them first.
        let _ = (|| -> Result<Diff, MapError> {
            Ok(each_in!(self, current, empty, |t, w| prune(t, w)?))
        })();
        Ok(change)
    }

    /// The plan in force, read back (generation-0 keys): what `apply` last put in force.
    pub fn in_force(&mut self) -> Result<MapContents, MapError> {
        let g = self.generation.get()?;
        Ok(MapContents {
            peers: InGeneration {
                table: &mut self.peers,
                generation: g,
            }
            .entries()?,
            owners: InGeneration {
                table: &mut self.owners,
                generation: g,
            }
            .entries()?,
            peer_policies: InGeneration {
                table: &mut self.peer_policies,
                generation: g,
            }
            .entries()?,
            actions: InGeneration {
                table: &mut self.actions,
                generation: g,
            }
            .entries()?,
            policies_v4: InGeneration {
                table: &mut self.policies_v4,
                generation: g,
            }
            .entries()?,
            policies_v6: InGeneration {
                table: &mut self.policies_v6,
                generation: g,
            }
            .entries()?,
        })
    }
}

/// What `want` adds, updates and removes against `have`.
fn diff_of<K: Ord, V: PartialEq>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> Diff {
    let mut d = Diff::default();
    for (k, v) in want {
        match have.get(k) {
            Some(h) if h == v => {}
            Some(_) => d.updated += 1,
            None => d.added += 1,
        }
    }
    d.removed = have.keys().filter(|k| !want.contains_key(k)).count();
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use egress_common::generation;

    #[test]
    fn diff_adds_updates_removes_and_leaves_the_rest() {
        let mut table: BTreeMap<u32, &str> = [(1, "a"), (2, "b"), (3, "c")].into();
        let want: BTreeMap<u32, &str> = [(1, "a"), (2, "B"), (4, "d")].into();
        let up = upsert(&mut table, &want).unwrap();
        assert_eq!(
            up,
            Diff {
                added: 1,
                updated: 1,
                removed: 0
            }
        );
        assert_eq!(
            table.get(&3),
            Some(&"c"),
            "nothing removed before the upserts are done"
        );
        let pr = prune(&mut table, &want).unwrap();
        assert_eq!(
            pr,
            Diff {
                added: 0,
                updated: 0,
                removed: 1
            }
        );
        assert_eq!(table, want);
        assert_eq!(
            upsert(&mut table, &want).unwrap(),
            Diff::default(),
            "applying again changes nothing"
        );
    }

    /// Records the order of writes to check that policies never point at a missing action.
    #[derive(Default)]
    struct Log<'a> {
        inner: BTreeMap<u8, u8>,
        name: &'static str,
        ops: Option<&'a std::cell::RefCell<Vec<String>>>,
    }

    impl Table<u8, u8> for Log<'_> {
        fn entries(&self) -> Result<BTreeMap<u8, u8>, MapError> {
            Ok(self.inner.clone())
        }
        fn put(&mut self, k: &u8, v: &u8) -> Result<(), MapError> {
            self.ops
                .unwrap()
                .borrow_mut()
                .push(format!("put {} {k}", self.name));
            self.inner.insert(*k, *v);
            Ok(())
        }
        fn delete(&mut self, k: &u8) -> Result<(), MapError> {
            self.ops
                .unwrap()
                .borrow_mut()
                .push(format!("del {} {k}", self.name));
            self.inner.remove(k);
            Ok(())
        }
    }

    #[test]
    fn actions_go_in_before_policies_and_out_after_them() {
        let ops = std::cell::RefCell::new(Vec::new());
        let mut actions = Log {
            inner: [(1, 1)].into(),
            name: "action",
            ops: Some(&ops),
        };
        let mut policies = Log {
            inner: [(10, 1)].into(),
            name: "policy",
            ops: Some(&ops),
        };
        // Replace pool 1 by pool 2.
        let want_actions: BTreeMap<u8, u8> = [(2, 2)].into();
        let want_policies: BTreeMap<u8, u8> = [(20, 2)].into();
        upsert(&mut actions, &want_actions).unwrap();
        upsert(&mut policies, &want_policies).unwrap();
        prune(&mut policies, &want_policies).unwrap();
        prune(&mut actions, &want_actions).unwrap();
        assert_eq!(
            *ops.borrow(),
            [
                "put action 2",
                "put policy 20",
                "del policy 10",
                "del action 1"
            ]
        );
    }

    /// A plan table (any key type) logging each write's generation, with the generation in
    /// force at that moment, into a shared log.
    struct Spy<'a, K, V> {
        inner: BTreeMap<K, V>,
        log: &'a std::cell::RefCell<Vec<(u8, u8)>>,
        cell: &'a std::cell::Cell<u8>,
        /// Whole-table reads (each costs two syscalls per entry on a BPF map).
        reads: std::cell::Cell<usize>,
        /// Puts that succeed before every further one fails (None: all succeed).
        puts_left: std::cell::Cell<Option<usize>>,
    }

    impl<K: Generational + Ord, V: Clone> Table<K, V> for Spy<'_, K, V> {
        fn entries(&self) -> Result<BTreeMap<K, V>, MapError> {
            self.reads.set(self.reads.get() + 1);
            Ok(self
                .inner
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }
        fn put(&mut self, k: &K, v: &V) -> Result<(), MapError> {
            match self.puts_left.get() {
                Some(0) => return Err(MapError::KeyNotFound),
                Some(n) => self.puts_left.set(Some(n - 1)),
                None => {}
            }
            self.log
                .borrow_mut()
                .push((k.generation(), self.cell.get()));
            self.inner.insert(k.clone(), v.clone());
            Ok(())
        }
        fn delete(&mut self, k: &K) -> Result<(), MapError> {
            self.log
                .borrow_mut()
                .push((k.generation(), self.cell.get()));
            self.inner.remove(k);
            Ok(())
        }
    }

    struct SpyCell<'a>(&'a std::cell::Cell<u8>);
    impl GenerationCell for SpyCell<'_> {
        fn get(&self) -> Result<u8, MapError> {
            Ok(self.0.get())
        }
        fn set(&mut self, g: u8) -> Result<(), MapError> {
            self.0.set(g);
            Ok(())
        }
    }

    /// Empty spy tables sharing one write log and generation cell.
    #[allow(clippy::type_complexity)]
    fn spy_tables<'a>(
        log: &'a std::cell::RefCell<Vec<(u8, u8)>>,
        cell: &'a std::cell::Cell<u8>,
    ) -> PlanTables<
        Spy<'a, egress_common::action::ActionKey, egress_common::action::Action>,
        Spy<'a, crate::plan::LpmKeyV4, egress_common::policy::PolicyValue>,
        Spy<'a, crate::plan::LpmKeyV6, egress_common::policy::PolicyValue>,
        Spy<'a, egress_common::fabric::AddrKey, egress_common::fabric::Peer>,
        Spy<'a, egress_common::fabric::AddrKey, egress_common::fabric::Owners>,
        Spy<'a, crate::plan::LpmKeyPeer, egress_common::policy::PolicyValue>,
        SpyCell<'a>,
        FilterSpy<'a>,
    > {
        fn spy<'a, K, V>(
            log: &'a std::cell::RefCell<Vec<(u8, u8)>>,
            cell: &'a std::cell::Cell<u8>,
        ) -> Spy<'a, K, V> {
            Spy {
                inner: BTreeMap::new(),
                log,
                cell,
                reads: Default::default(),
                puts_left: Default::default(),
            }
        }
        PlanTables {
            actions: spy(log, cell),
            policies_v4: spy(log, cell),
            policies_v6: spy(log, cell),
            peers: spy(log, cell),
            owners: spy(log, cell),
            peer_policies: spy(log, cell),
            generation: SpyCell(cell),
            filter: FilterSpy {
                last: None,
                at: Vec::new(),
                cell,
            },
        }
    }

    fn contents(config: &crate::config::Config, server: &str) -> MapContents {
        let t = crate::validate::validate(config).unwrap();
        crate::plan::map_contents(&t, &crate::plan::plan(&t, server))
    }

    /// Records the generation in force at each admission.
    struct FilterSpy<'a> {
        last: Option<crate::filter::Buckets>,
        at: Vec<u8>,
        cell: &'a std::cell::Cell<u8>,
    }
    impl crate::filter::FilterCell for FilterSpy<'_> {
        fn admit(&mut self, maybe: &crate::filter::Buckets) -> Result<(), MapError> {
            self.at.push(self.cell.get());
            self.last = Some(maybe.clone());
            Ok(())
        }
    }

    #[test]
    fn a_plan_switch_never_writes_the_generation_in_force_and_flips_once() {
        // Plan A, then B (a port range moved, a server added), then A again, on every table.
        let a = crate::config::Config::embedded();
        let text = crate::config::DEFAULT_CONFIG.replace(
            r#"{ server = "ams-a-1", ports = "32768-65535" },"#,
            r#"{ server = "ams-a-1", ports = "32768-39999" },
  { server = "fra-a-2", ports = "40000-49999" },
  { server = "ams-a-1", ports = "50000-65535" },"#,
        ) + "\n[[servers]]\nname = \"new-1\"\nid = 99\ndatacenter = \"fra-a\"\nfabric = \"10.50.0.99\"\nuplink = \"eth0\"\n";
        let b = crate::config::Config::parse(&text, "b").unwrap();
        let log = std::cell::RefCell::new(Vec::new());
        let cell = std::cell::Cell::new(0u8);
        let mut t = spy_tables(&log, &cell);
        let mut in_force = MapContents::default();
        for (i, want) in [
            contents(&a, "fra-a-2"),
            contents(&b, "fra-a-2"),
            contents(&a, "fra-a-2"),
        ]
        .iter()
        .enumerate()
        {
            log.borrow_mut().clear();
            let before = cell.get();
            macro_rules! reads {
                () => {
                    [
                        t.actions.reads.take(),
                        t.policies_v4.reads.take(),
                        t.policies_v6.reads.take(),
                        t.peers.reads.take(),
                        t.owners.reads.take(),
                        t.peer_policies.reads.take(),
                    ]
                };
            }
            reads!();
            let d = t.apply(want).unwrap();
            assert_eq!(reads!(), [1; 6], "switch {i}: each table read once");
            assert_eq!(cell.get(), generation::next(before), "switch {i}: one flip");
            // The new plan's buckets were admitted once, before the flip (the old plan's stay
            // admitted: `FilterCell` has no way to pass a bucket again).
            assert_eq!(
                std::mem::take(&mut t.filter.at),
                [before],
                "switch {i}: admitted once, before the flip"
            );
            assert_eq!(
                t.filter.last,
                Some(crate::filter::Buckets::of_plan(want)),
                "switch {i}: the new plan's buckets"
            );
            // Before the flip every write went to the other generation; after it, only the old
            // one was emptied. The generation in force was never written.
            for (written, in_force_then) in log.borrow().iter() {
                assert_ne!(
                    written, in_force_then,
                    "switch {i}: wrote the generation in force"
                );
            }
            assert_eq!(
                t.in_force().unwrap(),
                *want,
                "switch {i}: the new plan, whole"
            );
            // Nothing left of the old generation, in any table.
            let left = |gens: Vec<u8>| gens.iter().filter(|g| **g == before).count();
            assert_eq!(
                left(
                    t.actions
                        .inner
                        .keys()
                        .map(Generational::generation)
                        .collect()
                ) + left(t.peers.inner.keys().map(Generational::generation).collect())
                    + left(
                        t.owners
                            .inner
                            .keys()
                            .map(Generational::generation)
                            .collect()
                    )
                    + left(
                        t.policies_v4
                            .inner
                            .keys()
                            .map(Generational::generation)
                            .collect()
                    )
                    + left(
                        t.policies_v6
                            .inner
                            .keys()
                            .map(Generational::generation)
                            .collect()
                    )
                    + left(
                        t.peer_policies
                            .inner
                            .keys()
                            .map(Generational::generation)
                            .collect()
                    ),
                0,
                "switch {i}: the old generation removed"
            );
            let expect = super::diff_of(&in_force.actions, &want.actions);
            if i > 0 {
                assert!(d.added + d.updated + d.removed > 0, "switch {i}: {d:?}");
                assert!(d.updated >= expect.updated);
            }
            in_force = want.clone();
        }
        assert_ne!(contents(&a, "fra-a-2"), contents(&b, "fra-a-2"));

        // A crashed agent's leftovers in the generation not in force: the next switch clears
        // them first; the maps end with exactly the new plan.
        let stale = contents(&b, "fra-a-1");
        let next = generation::next(cell.get());
        for (k, v) in &stale.actions {
            t.actions.inner.insert(k.in_generation(next), *v);
        }
        let want = contents(&b, "fra-a-2");
        t.apply(&want).unwrap();
        assert_eq!(t.in_force().unwrap(), want);
        assert_eq!(t.actions.inner.len(), want.actions.len(), "no leftovers");
    }

    /// A plan write that fails half-way (a map refuses a put, through the read-once copy):
    /// nothing switches, the plan in force stays whole, and what was written goes again — the
    /// copy followed only the writes that succeeded. The next write then succeeds whole.
    #[test]
    fn a_plan_write_that_fails_half_way_leaves_the_plan_in_force_and_nothing_else() {
        let a = crate::config::Config::embedded();
        let text = crate::config::DEFAULT_CONFIG.replace(
            r#"{ server = "ams-a-1", ports = "32768-65535" },"#,
            r#"{ server = "ams-a-1", ports = "32768-39999" },
  { server = "fra-a-2", ports = "40000-65535" },"#,
        );
        let b = crate::config::Config::parse(&text, "b").unwrap();
        let log = std::cell::RefCell::new(Vec::new());
        let cell = std::cell::Cell::new(0u8);
        let mut t = spy_tables(&log, &cell);
        let (want_a, want_b) = (contents(&a, "fra-a-2"), contents(&b, "fra-a-2"));
        assert_ne!(want_a, want_b);
        t.apply(&want_a).unwrap();
        let before = cell.get();
        macro_rules! snapshot {
            () => {
                (
                    t.actions.inner.clone(),
                    t.policies_v4.inner.clone(),
                    t.policies_v6.inner.clone(),
                    t.peers.inner.clone(),
                    t.owners.inner.clone(),
                    t.peer_policies.inner.clone(),
                )
            };
        }
        let whole = snapshot!();
        // Actions are written after peers and owners, before policies: some puts of the new
        // generation have landed when one fails.
        t.actions.puts_left.set(Some(1));
        log.borrow_mut().clear();
        assert!(t.apply(&want_b).is_err(), "the failed put is reported");
        // Peers, owners and what peers may use first, then one action: all to go again.
        assert!(
            log.borrow().len() > 1,
            "writes were made before the failure"
        );
        assert_eq!(cell.get(), before, "no switch");
        assert_eq!(t.in_force().unwrap(), want_a, "the plan in force, whole");
        assert_eq!(
            snapshot!(),
            whole,
            "what was written went again, nothing else"
        );
        t.actions.puts_left.set(None);
        t.apply(&want_b).unwrap();
        assert_eq!(t.in_force().unwrap(), want_b);
        assert_eq!(t.actions.inner.len(), want_b.actions.len(), "no leftovers");
    }
}
