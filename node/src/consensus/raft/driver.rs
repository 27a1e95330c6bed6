//! The one thread that owns the `RawNode`. Each turn: take every message
//! waiting in the inbox, tick if due, then handle `Ready` in the library's
//! order — persist (and fsync) entries and hard state before sending the
//! messages that depend on them, apply committed entries, advance.

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use piehole_protocol::pb;
use prost::Message as _;
use raft::prelude::{Entry, EntryType, Message, Snapshot};
use raft::{RawNode, SnapshotStatus};

use super::proposals::Proposals;
use super::storage::RaftStorage;
use super::RaftProgress;
use crate::config::NodeConfig;
use crate::state::StateMachine;

pub enum DriverMsg {
    /// An encoded `pb::Command` to append to the log.
    Propose {
        request_id: u64,
        data: Vec<u8>,
    },
    /// Messages from a peer.
    Raft(Vec<Message>),
    Unreachable(u64),
    SnapshotSent {
        to: u64,
        ok: bool,
    },
}

pub struct Driver {
    raw: RawNode<RaftStorage>,
    state: Arc<StateMachine>,
    inbox: mpsc::Receiver<DriverMsg>,
    outbox: Box<dyn Fn(Vec<Message>) + Send>,
    proposals: Arc<Proposals>,
    progress: Arc<Mutex<RaftProgress>>,
    tick: Duration,
    /// Compact the log once this many entries were applied since the last snapshot point.
    snapshot_interval: u64,
    snapshots_installed: u64,
}

/// A crash between restoring the state from a snapshot and truncating the
/// log leaves the state ahead of the log; the snapshot's metadata, kept with
/// the state, lets the log catch up before raft starts.
fn finish_interrupted_snapshot(state: &StateMachine, storage: &RaftStorage) -> anyhow::Result<()> {
    let Some(bytes) = state.restored_from()? else {
        return Ok(());
    };
    let meta: raft::prelude::SnapshotMetadata = protobuf::Message::parse_from_bytes(&bytes)?;
    if meta.index > storage.snapshot_metadata()?.index {
        tracing::warn!(
            index = meta.index,
            "finishing a snapshot install interrupted by a crash"
        );
        let mut snap = Snapshot::default();
        snap.set_metadata(meta);
        storage.apply_snapshot(&snap)?;
        storage.flush()?;
    }
    Ok(())
}

/// The member list is fixed when a cluster is first started; a node started
/// later with a different --peers would silently disagree with the others.
fn check_membership(config: &NodeConfig, storage: &RaftStorage) -> anyhow::Result<()> {
    let stored: std::collections::BTreeSet<u64> = storage.voters()?.into_iter().collect();
    let given: std::collections::BTreeSet<u64> = config.peers.keys().copied().collect();
    if stored != given {
        anyhow::bail!(
            "--peers names members {given:?} but this data dir belongs to a cluster of {stored:?}; \
             membership changes are not supported"
        );
    }
    Ok(())
}

impl Driver {
    pub fn new(
        config: &NodeConfig,
        storage: RaftStorage,
        state: Arc<StateMachine>,
        inbox: mpsc::Receiver<DriverMsg>,
        outbox: Box<dyn Fn(Vec<Message>) + Send>,
        proposals: Arc<Proposals>,
        progress: Arc<Mutex<RaftProgress>>,
    ) -> anyhow::Result<Self> {
        let raft_config = raft::Config {
            id: config.id,
            election_tick: 10,
            heartbeat_tick: 2,
            // The state machine is durable: do not hand back entries it already holds.
            applied: state.applied(),
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        raft_config.validate()?;
        finish_interrupted_snapshot(&state, &storage)?;
        storage.repair(state.applied())?;
        check_membership(config, &storage)?;
        let raw = RawNode::new(&raft_config, storage, &super::logger::logger())?;
        Ok(Driver {
            raw,
            state,
            inbox,
            outbox,
            proposals,
            progress,
            tick: config.tick,
            snapshot_interval: config.snapshot_interval,
            snapshots_installed: 0,
        })
    }

    /// The commit index as stored on disk when the node started.
    pub fn committed_at_start(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    pub fn run(mut self) -> anyhow::Result<()> {
        let mut last_tick = Instant::now();
        loop {
            let wait = self.tick.saturating_sub(last_tick.elapsed());
            match self.inbox.recv_timeout(wait) {
                Ok(msg) => self.handle(msg),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
            // Batch whatever else arrived so one fsync covers it all.
            while let Ok(msg) = self.inbox.try_recv() {
                self.handle(msg);
            }
            if last_tick.elapsed() >= self.tick {
                self.raw.tick();
                last_tick = Instant::now();
            }
            self.on_ready()?;
            self.publish_progress();
        }
    }

    fn handle(&mut self, msg: DriverMsg) {
        match msg {
            DriverMsg::Propose { request_id, data } => {
                // No leader known, say: its proposer offers it again.
                if let Err(e) = self.raw.propose(vec![], data) {
                    tracing::debug!(error = %e, "proposal dropped");
                    self.proposals.mark_lost(request_id);
                }
            }
            DriverMsg::Raft(msgs) => {
                for m in msgs {
                    if let Err(e) = self.raw.step(m) {
                        tracing::debug!(error = %e, "raft message ignored");
                    }
                }
            }
            DriverMsg::Unreachable(id) => self.raw.report_unreachable(id),
            DriverMsg::SnapshotSent { to, ok } => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
        }
    }

    fn on_ready(&mut self) -> anyhow::Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        // A leader may send before persisting (raft thesis 10.2.1).
        if !ready.messages().is_empty() {
            (self.outbox)(ready.take_messages());
        }
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot())?;
        }
        // Entries and hard state (with the commit index) go to disk before
        // anything is applied, so the applied index never runs ahead of the
        // stored commit index, whatever sled has flushed when we are killed.
        let store = self.raw.store();
        store.append(ready.entries())?;
        if let Some(hs) = ready.hs() {
            store.set_hard_state(hs)?;
        }
        store.flush()?;
        self.apply(ready.take_committed_entries())?;
        if !ready.persisted_messages().is_empty() {
            (self.outbox)(ready.take_persisted_messages());
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            // On disk before anything it covers is applied: after a crash,
            // the state is replayed up to the stored commit index before
            // local refs may follow it again (see `wait_replayed`).
            self.raw.store().set_commit(commit)?;
            self.raw.store().flush()?;
        }
        (self.outbox)(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.maybe_compact()
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> anyhow::Result<()> {
        let index = snap.get_metadata().index;
        tracing::info!(index, "installing snapshot from leader");
        let meta = protobuf::Message::write_to_bytes(snap.get_metadata())?;
        self.state.restore(index, &snap.data, &meta)?;
        self.raw.mut_store().apply_snapshot(snap)?;
        self.raw.store().flush()?;
        self.snapshots_installed += 1;
        self.proposals
            .resolve_covered(self.raw.raft.id, &self.state);
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> anyhow::Result<()> {
        for entry in entries {
            if entry.data.is_empty() || entry.get_entry_type() != EntryType::EntryNormal {
                self.state.skip(entry.index)?;
                continue;
            }
            let cmd = match pb::Command::decode(&entry.data[..]) {
                Ok(cmd) => cmd,
                Err(e) => {
                    tracing::error!(index = entry.index, error = %e, "undecodable log entry skipped");
                    self.state.skip(entry.index)?;
                    continue;
                }
            };
            let outcome = self.state.apply(entry.index, &cmd)?;
            if cmd.origin_node == self.raw.raft.id {
                self.proposals.resolve(cmd.request_id, outcome);
            }
        }
        Ok(())
    }

    fn maybe_compact(&mut self) -> anyhow::Result<()> {
        // A short tail stays so a follower a moment behind needs no snapshot.
        const KEEP: u64 = 64;
        let applied = self.state.applied();
        let store = self.raw.store();
        let snapshot_index = store.snapshot_metadata()?.index;
        let target = applied.saturating_sub(KEEP);
        if target >= snapshot_index + self.snapshot_interval && target <= store.last_index_now()? {
            // The state machine must be on disk before the log that rebuilds it goes.
            store.flush()?;
            store.compact(target)?;
            tracing::info!(applied, compacted_to = target, "log compacted");
        }
        Ok(())
    }

    fn publish_progress(&self) {
        let raft = &self.raw.raft;
        let store = self.raw.store();
        let p = RaftProgress {
            leader_id: raft.leader_id,
            term: raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: self.state.applied(),
            first_log_index: store.first_index_now().unwrap_or(0),
            snapshot_index: store.snapshot_metadata().map(|m| m.index).unwrap_or(0),
            snapshots_installed: self.snapshots_installed,
        };
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }
}
