//! The Raft log, hard state and snapshot metadata in sled.
//!
//! Entries are written by the driver (`append`, `set_hard_state`) and made
//! durable with [`RaftStorage::flush`] before anything that depends on them
//! is sent. Snapshot *data* is never stored here: the state machine is the
//! snapshot, so `snapshot()` serialises it fresh at its applied index.

use std::sync::Arc;

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

use piehole_protocol::pb;

use crate::disk::Disk;
use crate::state::StateMachine;

const HARD_STATE: &[u8] = b"hard_state";
/// The layout of the log's entries and the state machine, as this version
/// writes them; a data dir of another (or no recorded) format is refused.
const FORMAT: &[u8] = b"format";
const CURRENT_FORMAT: u64 = 3;
const CONF_STATE: &[u8] = b"conf_state";
/// Written last when a data dir is bootstrapped or joins: from then on it
/// belongs to that cluster.
const CLUSTER_ID: &[u8] = b"cluster_id";
const FOUNDERS: &[u8] = b"founders";
/// Before bootstrap: this node's random contribution to the handshake.
const NONCE: &[u8] = b"bootstrap_nonce";
/// The log index of the last configuration change stored in CONF_STATE.
const CONF_INDEX: &[u8] = b"conf_index";
const SNAPSHOT_META: &[u8] = b"snapshot_meta";

pub struct RaftStorage {
    disk: Arc<Disk>,
    /// Log entries keyed by big-endian index, so sled's order is log order.
    log: sled::Tree,
    /// Hard state, conf state, snapshot metadata.
    meta: sled::Tree,
    state: Arc<StateMachine>,
}

fn store_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

fn decode<M: protobuf::Message>(bytes: &[u8]) -> raft::Result<M> {
    M::parse_from_bytes(bytes).map_err(store_err)
}

impl RaftStorage {
    /// Opens the log in `disk`. A data dir of another format is refused; an
    /// empty one stays empty until [`RaftStorage::bootstrap`] or
    /// [`RaftStorage::join`] records which cluster it belongs to.
    pub fn open(disk: Arc<Disk>, state: Arc<StateMachine>) -> anyhow::Result<Self> {
        let storage = RaftStorage {
            log: disk.db().open_tree("raft_log")?,
            meta: disk.db().open_tree("raft_meta")?,
            disk,
            state,
        };
        match (storage.meta.get(CONF_STATE)?, storage.meta.get(FORMAT)?) {
            (None, _) => {}
            (Some(_), Some(f)) if f.as_ref() == CURRENT_FORMAT.to_be_bytes() => {}
            (Some(_), _) => anyhow::bail!(
                "this data dir was written by an earlier piehole, whose log this version \
                 would replay differently; there is no upgrade path for it: start the \
                 cluster from fresh data dirs"
            ),
        }
        Ok(storage)
    }

    /// The cluster this data dir belongs to; None before bootstrap or join.
    pub fn cluster_id(&self) -> anyhow::Result<Option<u64>> {
        Ok(self.meta.get(CLUSTER_ID)?.map(|b| be_u64(&b)))
    }

    /// The founding members recorded at bootstrap (or learned at join).
    pub fn founders(&self) -> anyhow::Result<Vec<pb::Founder>> {
        match self.meta.get(FOUNDERS)? {
            Some(b) => {
                Ok(prost::Message::decode(b.as_ref()).map(|r: pb::ClusterInfoReply| r.founders)?)
            }
            None => Ok(Vec::new()),
        }
    }

    /// This node's bootstrap nonce, created (and made durable) on first use:
    /// it must never change once a peer may have seen it.
    pub fn bootstrap_nonce(&self) -> anyhow::Result<u64> {
        if let Some(b) = self.meta.get(NONCE)? {
            return Ok(be_u64(&b));
        }
        let nonce = rand::random::<u64>().max(1);
        self.meta.insert(NONCE, &nonce.to_be_bytes())?;
        self.flush()?;
        Ok(nonce)
    }

    /// Records a new cluster: the founders are its voters, and the log
    /// starts after a snapshot point at index 1, so that a member added
    /// later (with an empty log) is always brought in by a snapshot, which
    /// carries the configuration.
    pub fn bootstrap(&self, cluster_id: u64, founders: &[pb::Founder]) -> anyhow::Result<()> {
        let cs = ConfState {
            voters: founders.iter().map(|f| f.id).collect(),
            ..Default::default()
        };
        let mut meta = SnapshotMetadata {
            index: 1,
            term: 1,
            ..Default::default()
        };
        meta.set_conf_state(cs.clone());
        let hs = HardState {
            term: 1,
            commit: 1,
            ..Default::default()
        };
        let mut batch = sled::Batch::default();
        batch.insert(CONF_STATE, cs.write_to_bytes()?);
        batch.insert(SNAPSHOT_META, meta.write_to_bytes()?);
        batch.insert(HARD_STATE, hs.write_to_bytes()?);
        batch.insert(CONF_INDEX, &1u64.to_be_bytes());
        self.record_identity(&mut batch, cluster_id, founders);
        self.meta.apply_batch(batch)?;
        self.flush()
    }

    /// Records the cluster a node added by `member add` joins: no voters
    /// and an empty log until the leader's snapshot brings both.
    pub fn join(&self, cluster_id: u64, founders: &[pb::Founder]) -> anyhow::Result<()> {
        let mut batch = sled::Batch::default();
        batch.insert(CONF_STATE, ConfState::default().write_to_bytes()?);
        self.record_identity(&mut batch, cluster_id, founders);
        self.meta.apply_batch(batch)?;
        self.flush()
    }

    fn record_identity(&self, batch: &mut sled::Batch, cluster_id: u64, founders: &[pb::Founder]) {
        use prost::Message as _;
        let founders = pb::ClusterInfoReply {
            founders: founders.to_vec(),
            ..Default::default()
        };
        batch.insert(FOUNDERS, founders.encode_to_vec());
        batch.insert(FORMAT, &CURRENT_FORMAT.to_be_bytes());
        batch.insert(CLUSTER_ID, &cluster_id.to_be_bytes());
    }

    /// Makes everything written so far durable (fsync, not only sled's flush).
    pub fn flush(&self) -> anyhow::Result<()> {
        self.disk.sync()
    }

    pub fn snapshot_metadata(&self) -> raft::Result<SnapshotMetadata> {
        match self.meta.get(SNAPSHOT_META).map_err(store_err)? {
            Some(b) => decode(&b),
            None => Ok(SnapshotMetadata::default()),
        }
    }

    /// Stored when a configuration change at log `index` is applied, before
    /// the state machine records it. After a crash in between, the entry is
    /// replayed; `conf_index` tells the driver raft already has it.
    pub fn set_conf_state(&self, cs: &ConfState, index: u64) -> raft::Result<()> {
        let mut batch = sled::Batch::default();
        batch.insert(CONF_STATE, cs.write_to_bytes().map_err(store_err)?);
        batch.insert(CONF_INDEX, &index.to_be_bytes());
        self.meta.apply_batch(batch).map_err(store_err)
    }

    /// The log index of the configuration stored (0: none since bootstrap).
    pub fn conf_index(&self) -> anyhow::Result<u64> {
        Ok(self.meta.get(CONF_INDEX)?.map(|b| be_u64(&b)).unwrap_or(0))
    }

    pub fn conf_state(&self) -> raft::Result<ConfState> {
        match self.meta.get(CONF_STATE).map_err(store_err)? {
            Some(b) => decode(&b),
            None => Ok(ConfState::default()),
        }
    }

    pub fn hard_state(&self) -> raft::Result<HardState> {
        match self.meta.get(HARD_STATE).map_err(store_err)? {
            Some(b) => decode(&b),
            None => Ok(HardState::default()),
        }
    }

    pub fn set_hard_state(&self, hs: &HardState) -> raft::Result<()> {
        let bytes = hs.write_to_bytes().map_err(store_err)?;
        self.meta.insert(HARD_STATE, bytes).map_err(store_err)?;
        Ok(())
    }

    pub fn set_commit(&self, commit: u64) -> raft::Result<()> {
        let mut hs = self.hard_state()?;
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    /// Appends entries, replacing any conflicting suffix of the log.
    pub fn append(&self, entries: &[Entry]) -> raft::Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let mut batch = sled::Batch::default();
        // Raft may overwrite an uncommitted suffix after a leader change.
        for old in self.log.range(first.index.to_be_bytes()..) {
            let (k, _) = old.map_err(store_err)?;
            batch.remove(k);
        }
        for e in entries {
            batch.insert(
                &e.index.to_be_bytes(),
                e.write_to_bytes().map_err(store_err)?,
            );
        }
        self.log.apply_batch(batch).map_err(store_err)
    }

    /// Drops log entries up to and including `index`, recording `index` as
    /// the snapshot point. Called after the state machine applied `index`.
    pub fn compact(&self, index: u64) -> raft::Result<()> {
        let term = self.term_of(index)?;
        let mut meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        meta.set_conf_state(self.conf_state()?);
        self.meta
            .insert(SNAPSHOT_META, meta.write_to_bytes().map_err(store_err)?)
            .map_err(store_err)?;
        let mut batch = sled::Batch::default();
        for old in self.log.range(..=index.to_be_bytes()) {
            let (k, _) = old.map_err(store_err)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(store_err)
    }

    /// Installs a snapshot received from the leader: the log is replaced by
    /// the snapshot point. The caller restores the state machine.
    pub fn apply_snapshot(&self, snap: &Snapshot) -> raft::Result<()> {
        let meta = snap.get_metadata();
        let mut hs = self.hard_state()?;
        if meta.term > hs.term {
            hs.term = meta.term;
            hs.vote = 0;
        }
        hs.commit = hs.commit.max(meta.index);
        // Snapshot point, configuration and hard state in one atomic batch;
        // stale log entries go after. A crash in between leaves entries at or
        // below the snapshot point, which first()/last()/term() ignore.
        let mut batch = sled::Batch::default();
        batch.insert(SNAPSHOT_META, meta.write_to_bytes().map_err(store_err)?);
        batch.insert(
            CONF_STATE,
            meta.get_conf_state().write_to_bytes().map_err(store_err)?,
        );
        batch.insert(CONF_INDEX, &meta.index.to_be_bytes());
        batch.insert(HARD_STATE, hs.write_to_bytes().map_err(store_err)?);
        self.meta.apply_batch(batch).map_err(store_err)?;
        let mut batch = sled::Batch::default();
        for old in self.log.iter() {
            let (k, _) = old.map_err(store_err)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(store_err)
    }

    /// After a crash: the commit index must cover whatever the state machine
    /// already applied (only committed entries are ever applied), or raft
    /// refuses to start. Also drops log entries left below the snapshot point.
    pub fn repair(&self, applied: u64) -> anyhow::Result<()> {
        let snap = self.snapshot_metadata()?;
        let mut stale = sled::Batch::default();
        for old in self.log.range(..=snap.index.to_be_bytes()) {
            stale.remove(old?.0);
        }
        self.log.apply_batch(stale)?;
        let mut hs = self.hard_state()?;
        let floor = applied.max(snap.index).min(self.last()?);
        if hs.commit < floor {
            tracing::warn!(
                from = hs.commit,
                to = floor,
                "raising the stored commit index to what was applied"
            );
            hs.commit = floor;
            self.set_hard_state(&hs)?;
        }
        self.flush()
    }

    fn entry(&self, index: u64) -> raft::Result<Option<Entry>> {
        match self.log.get(index.to_be_bytes()).map_err(store_err)? {
            Some(b) => Ok(Some(decode(&b)?)),
            None => Ok(None),
        }
    }

    fn term_of(&self, idx: u64) -> raft::Result<u64> {
        let snap = self.snapshot_metadata()?;
        if idx == snap.index {
            return Ok(snap.term);
        }
        if idx < snap.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.entry(idx)? {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first(&self) -> raft::Result<u64> {
        let after_snapshot = self.snapshot_metadata()?.index + 1;
        match self.log.first().map_err(store_err)? {
            Some((k, _)) => Ok(index_of(&k).max(after_snapshot)),
            None => Ok(after_snapshot),
        }
    }

    fn last(&self) -> raft::Result<u64> {
        let snapshot = self.snapshot_metadata()?.index;
        match self.log.last().map_err(store_err)? {
            Some((k, _)) => Ok(index_of(&k).max(snapshot)),
            None => Ok(snapshot),
        }
    }
}

impl RaftStorage {
    pub fn first_index_now(&self) -> raft::Result<u64> {
        self.first()
    }

    pub fn last_index_now(&self) -> raft::Result<u64> {
        self.last()
    }
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap_or([0; 8]))
}

fn index_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[..8]);
    u64::from_be_bytes(b)
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state()?, self.conf_state()?))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first()? {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let mut out = Vec::with_capacity((high - low) as usize);
        for kv in self.log.range(low.to_be_bytes()..high.to_be_bytes()) {
            let (_, v) = kv.map_err(store_err)?;
            out.push(decode::<Entry>(&v)?);
        }
        if out.len() as u64 != high - low {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.term_of(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.first()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.last()
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let (applied, data) = self.state.snapshot().map_err(store_err)?;
        if applied < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snap = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = applied;
        meta.term = self.term_of(applied)?;
        meta.set_conf_state(self.conf_state()?);
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage as _;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    fn open(dir: &tempfile::TempDir) -> RaftStorage {
        let disk = Arc::new(Disk::open(&dir.path().join("db")).unwrap());
        let state = Arc::new(StateMachine::open(disk.clone()).unwrap());
        let s = RaftStorage::open(disk, state).unwrap();
        let founders: Vec<pb::Founder> = (1..=3)
            .map(|id| pb::Founder {
                id,
                nonce: id,
                addr: String::new(),
            })
            .collect();
        s.bootstrap(7, &founders).unwrap();
        s
    }

    #[test]
    fn a_data_dir_of_an_older_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        // As an earlier piehole left it: a log, no recorded format.
        s.meta.remove(FORMAT).unwrap();
        s.flush().unwrap();
        drop(s);
        let disk = Arc::new(Disk::open(&dir.path().join("db")).unwrap());
        let state = Arc::new(StateMachine::open(disk.clone()).unwrap());
        let e = RaftStorage::open(disk, state).err().unwrap();
        assert!(e.to_string().contains("earlier piehole"), "{e}");
    }

    #[test]
    fn repair_raises_commit_to_what_was_applied() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        s.append(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        s.set_commit(2).unwrap();
        // As after a kill that persisted the applied index but not the commit.
        s.repair(4).unwrap();
        assert_eq!(s.hard_state().unwrap().commit, 4);
        // Never beyond the log.
        s.repair(9).unwrap();
        assert_eq!(s.hard_state().unwrap().commit, 5);
    }

    #[test]
    fn snapshot_point_hides_stale_entries_and_compaction_keeps_terms() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        s.append(&(1..=10).map(|i| entry(i, 1 + i / 5)).collect::<Vec<_>>())
            .unwrap();
        s.compact(6).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (7, 10));
        assert_eq!(s.term(6).unwrap(), 2);
        assert!(s.term(5).is_err());
        assert_eq!(
            s.entries(7, 11, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            4
        );

        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 4;
        s.apply_snapshot(&snap).unwrap();
        assert_eq!(
            (s.first_index().unwrap(), s.last_index().unwrap()),
            (21, 20)
        );
        assert_eq!(s.hard_state().unwrap().commit, 20);
        assert_eq!(s.hard_state().unwrap().term, 4);
    }
}
