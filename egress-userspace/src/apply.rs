//! Writing map contents as a difference against what the maps hold: add what is missing, update
//! what changed, remove what is gone. Never a flush, so established flows and unchanged entries
//! are not disturbed. The order (new actions before the policies that use them; policies removed
//! before their actions) means the datapath never sees a policy without its action.

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

/// The agent's plan tables.
pub struct PlanTables<A, P4, P6, PE, OW, PP> {
    pub actions: A,
    pub policies_v4: P4,
    pub policies_v6: P6,
    pub peers: PE,
    pub owners: OW,
    pub peer_policies: PP,
}

impl<A, P4, P6, PE, OW, PP> PlanTables<A, P4, P6, PE, OW, PP>
where
    A: Table<egress_common::action::ActionKey, egress_common::action::Action>,
    P4: Table<crate::plan::LpmKeyV4, egress_common::policy::PolicyValue>,
    P6: Table<crate::plan::LpmKeyV6, egress_common::policy::PolicyValue>,
    PE: Table<[u8; 4], egress_common::fabric::Peer>,
    OW: Table<[u8; 4], egress_common::fabric::Owners>,
    PP: Table<crate::plan::LpmKeyPeer, egress_common::policy::PolicyValue>,
{
    /// Makes the tables hold exactly `want`. Peers, owners and what peers may use go in first
    /// and out last, actions before the policies that use them and out after them.
    pub fn apply(&mut self, want: &MapContents) -> Result<Diff, MapError> {
        let mut d = upsert(&mut self.peers, &want.peers)?;
        d += upsert(&mut self.owners, &want.owners)?;
        d += upsert(&mut self.peer_policies, &want.peer_policies)?;
        d += upsert(&mut self.actions, &want.actions)?;
        d += upsert(&mut self.policies_v4, &want.policies_v4)?;
        d += upsert(&mut self.policies_v6, &want.policies_v6)?;
        d += prune(&mut self.policies_v4, &want.policies_v4)?;
        d += prune(&mut self.policies_v6, &want.policies_v6)?;
        d += prune(&mut self.actions, &want.actions)?;
        d += prune(&mut self.peer_policies, &want.peer_policies)?;
        d += prune(&mut self.owners, &want.owners)?;
        d += prune(&mut self.peers, &want.peers)?;
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
