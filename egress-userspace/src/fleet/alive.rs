//! The agent's view of its peers' alive keys (their leases): one watch stream per session, with
//! a watch on this agent's own key and one on each peer's key the agent asks about. When the
//! peers asked about change (a publish that moves next hops), only the new peers' keys are
//! read and watched and the dropped peers' watches are cancelled, on the same stream: a new
//! stream and a read of every key would cost every such agent round trips at every publish,
//! all of them at once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use etcd_client::{GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream};

use super::Endpoint;

/// What a session's alive-key watches cover and what they have said. Pure bookkeeping: the
/// stream and the reads are [`AliveView`]'s.
#[derive(Debug)]
pub struct AliveBook {
    /// This agent's own key: always watched, never among the peers present.
    own: String,
    /// Watches asked for and not confirmed yet, oldest first: etcd confirms a stream's creates
    /// in the order it receives them.
    creating: VecDeque<String>,
    /// Confirmed watches: their id by name.
    ids: BTreeMap<String, i64>,
    /// Watches cancelled here that etcd has not confirmed as cancelled yet.
    cancelling: BTreeSet<i64>,
    /// Per peer watched: the revision of the last read or event taken in, and whether its key
    /// existed then. An older event (a cancelled watch's last ones, after a newer read) is
    /// ignored.
    known: BTreeMap<String, (i64, bool)>,
}

/// What a watch's confirmation means here.
#[derive(Debug, PartialEq, Eq)]
pub enum Created {
    /// Still wanted: kept.
    Kept,
    /// No longer wanted (dropped while etcd was confirming it): to cancel.
    Cancel(i64),
    /// Nothing was being created: the stream is not what this book says.
    Unexpected,
}

impl AliveBook {
    /// A stream whose first watch, on `own`, has been asked for.
    pub fn new(own: &str) -> Self {
        Self {
            own: own.to_string(),
            creating: VecDeque::from([own.to_string()]),
            ids: BTreeMap::new(),
            cancelling: BTreeSet::new(),
            known: BTreeMap::new(),
        }
    }

    fn wanted(&self, name: &str, names: &BTreeSet<String>) -> bool {
        name == self.own || names.contains(name)
    }

    /// For the peers now asked about: those to read and watch (neither watched nor being
    /// created), and the watches to cancel (peers no longer asked about), forgotten here.
    pub fn change(&mut self, names: &BTreeSet<String>) -> (Vec<String>, Vec<i64>) {
        let add = names
            .iter()
            .filter(|n| **n != self.own && !self.ids.contains_key(*n) && !self.creating.contains(n))
            .cloned()
            .collect();
        let gone: Vec<String> = self
            .ids
            .keys()
            .filter(|n| !self.wanted(n, names))
            .cloned()
            .collect();
        let mut cancel = Vec::new();
        for n in gone {
            if let Some(id) = self.ids.remove(&n) {
                self.cancelling.insert(id);
                cancel.push(id);
            }
            self.known.remove(&n);
        }
        (add, cancel)
    }

    /// A read of `name`'s key at `revision`.
    pub fn read(&mut self, name: &str, revision: i64, exists: bool) {
        self.heard(name, revision, exists);
        self.known
            .entry(name.to_string())
            .or_insert((revision, exists));
    }

    /// A watch on `name`'s key asked for.
    pub fn asked(&mut self, name: &str) {
        self.creating.push_back(name.to_string());
    }

    /// etcd confirmed the oldest watch asked for, as `id`.
    pub fn created(&mut self, id: i64, names: &BTreeSet<String>) -> Created {
        let Some(name) = self.creating.pop_front() else {
            return Created::Unexpected;
        };
        if self.wanted(&name, names) {
            self.ids.insert(name, id);
            Created::Kept
        } else {
            self.known.remove(&name);
            self.cancelling.insert(id);
            Created::Cancel(id)
        }
    }

    /// etcd confirmed a cancellation: true if this book asked for it.
    pub fn cancelled(&mut self, id: i64) -> bool {
        self.cancelling.remove(&id)
    }

    /// An event on `name`'s key at `revision`: taken in if the peer is watched and the event is
    /// newer than what is known of it.
    pub fn heard(&mut self, name: &str, revision: i64, exists: bool) {
        if let Some(k) = self.known.get_mut(name)
            && revision > k.0
        {
            *k = (revision, exists);
        }
    }

    /// The peers asked about whose alive key exists, as far as the watches have said.
    pub fn present(&self, names: &BTreeSet<String>) -> BTreeSet<String> {
        self.known
            .iter()
            .filter(|(n, (_, exists))| *exists && names.contains(*n))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// A session's alive-key watch stream and its book.
pub struct AliveView {
    pub stream: WatchStream,
    pub book: AliveBook,
}

impl AliveView {
    /// A new stream, watching this agent's own key from the revision after `put` (when it was
    /// written), else from now on.
    pub async fn open(
        client: &mut etcd_client::Client,
        ep: &Endpoint,
        own: &str,
        put: Option<i64>,
    ) -> Result<Self, etcd_client::Error> {
        let from = put
            .filter(|r| *r > 0)
            .map(|r| WatchOptions::new().with_start_revision(r + 1));
        let stream = client.watch(ep.keys.alive(own), from).await?;
        Ok(Self {
            stream,
            book: AliveBook::new(own),
        })
    }

    /// Brings the watches to the peers `names`: cancels the dropped peers' watches, reads the
    /// new peers' keys (one transaction) and watches them from the revision after the read.
    pub async fn update(
        &mut self,
        client: &mut etcd_client::Client,
        ep: &Endpoint,
        names: &BTreeSet<String>,
    ) -> Result<(), etcd_client::Error> {
        let (add, cancel) = self.book.change(names);
        for id in cancel {
            self.stream.cancel(id).await?;
        }
        if add.is_empty() {
            return Ok(());
        }
        let ops: Vec<TxnOp> = add
            .iter()
            .map(|n| {
                // Serializable: the member's own state, no round with the leader. The watches
                // from the revision after it fill in whatever it lags behind.
                let only = GetOptions::new().with_keys_only().with_serializable();
                TxnOp::get(ep.keys.alive(n), Some(only))
            })
            .collect();
        let resp = client.txn(Txn::new().and_then(ops)).await?;
        let at = resp.header().map_or(0, |h| h.revision());
        for (n, r) in add.iter().zip(resp.op_responses()) {
            let exists = matches!(r, TxnOpResponse::Get(g) if !g.kvs().is_empty());
            self.book.read(n, at, exists);
        }
        for n in &add {
            let from = WatchOptions::new().with_start_revision(at + 1);
            self.stream.watch(ep.keys.alive(n), Some(from)).await?;
            self.book.asked(n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// Watches follow the peers asked about: only new peers are read and watched, dropped ones
    /// cancelled, a peer dropped while being created cancelled on confirmation, and one asked
    /// about again while being created neither watched twice nor forgotten.
    #[test]
    fn watches_follow_the_peers() {
        let mut b = AliveBook::new("me");
        let ab = set(&["a", "b"]);
        assert_eq!(b.change(&ab), (vec!["a".into(), "b".into()], vec![]));
        b.read("a", 10, true);
        b.read("b", 10, false);
        b.asked("a");
        b.asked("b");
        assert_eq!(b.present(&ab), set(&["a"]));
        // Asked again before etcd confirmed: nothing new.
        assert_eq!(b.change(&ab), (vec![], vec![]));
        assert_eq!(b.created(1, &ab), Created::Kept); // own key
        assert_eq!(b.created(2, &ab), Created::Kept); // a
        // b dropped while its create is in flight: cancelled once confirmed.
        let a = set(&["a"]);
        assert_eq!(b.change(&a), (vec![], vec![]));
        assert_eq!(b.created(3, &a), Created::Cancel(3));
        assert!(b.cancelled(3));
        assert!(!b.cancelled(3), "a cancellation is confirmed once");
        assert_eq!(b.created(4, &a), Created::Unexpected);
        // a dropped, c added: a's watch cancelled and a no longer present; the own key kept.
        let c = set(&["c"]);
        assert_eq!(b.change(&c), (vec!["c".into()], vec![2]));
        assert!(b.present(&set(&["a"])).is_empty());
        assert!(b.cancelled(2));
        // Dropped and asked again while still being created: kept, its read still counts.
        b.read("c", 20, true);
        b.asked("c");
        assert_eq!(b.change(&set(&[])), (vec![], vec![]));
        assert_eq!(b.change(&c), (vec![], vec![]));
        assert_eq!(b.created(5, &c), Created::Kept);
        assert_eq!(b.present(&c), c);
        // The own key is never a peer to add.
        assert_eq!(b.change(&set(&["me", "c"])), (vec![], vec![]));
    }

    /// Events are taken in newest first: an older one (a cancelled watch's, after a newer read)
    /// changes nothing; events of peers not watched are ignored.
    #[test]
    fn older_events_are_ignored() {
        let mut b = AliveBook::new("me");
        let a = set(&["a"]);
        b.change(&a);
        b.read("a", 10, true);
        b.heard("a", 9, false);
        assert_eq!(b.present(&a), a);
        b.heard("a", 11, false);
        assert!(b.present(&a).is_empty());
        b.heard("a", 11, true);
        assert!(b.present(&a).is_empty(), "same revision: not newer");
        b.heard("a", 12, true);
        assert_eq!(b.present(&a), a);
        b.heard("z", 13, true);
        assert!(b.present(&set(&["z"])).is_empty());
        // A read older than what the watch already said does not undo it.
        b.read("a", 11, false);
        assert_eq!(b.present(&a), a);
    }
}
