//! The one thread that owns the `RawNode`. Each turn: take every message
//! waiting in the inbox, tick if due, then handle `Ready` in the library's
//! order — persist (and fsync) entries and hard state before sending the
//! messages that depend on them, apply committed entries, advance.

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use piehole_protocol::pb;
use prost::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, Snapshot,
};
use raft::{ProgressState, RawNode, SnapshotStatus, StateRole};
use raft_proto::ConfChangeI as _;

use super::bootstrap::removed_message;
use super::members::MemberBook;
use super::proposals::Proposals;
use super::storage::RaftStorage;
use super::transport::PeerHealth;
use super::RaftProgress;
use crate::config::NodeConfig;
use crate::state::{Outcome, StateMachine};

/// A learner is promoted once its log is within this many entries of the
/// leader's.
const PROMOTE_WITHIN: u64 = 64;
/// How often the leader looks for learners to promote.
const PROMOTE_CHECK_EVERY: Duration = Duration::from_millis(200);
/// A removed node keeps answering this long, so that the reply to the
/// removal and the commit index reach the others, and a removed leader has
/// handed over.
const LINGER_AFTER_REMOVAL: Duration = Duration::from_secs(2);
/// A leader asked to remove itself refuses with this, after starting to
/// hand over; the caller asks the next leader.
pub const HANDING_OVER: &str =
    "this node leads and is the member to remove: it is handing over leadership first";

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
    /// A membership change to check and propose; on the leader only.
    ChangeMember(pb::MemberChange),
    /// A member refused us as removed from the cluster.
    Removed(String),
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
    members: Arc<MemberBook>,
    /// Which peers answered lately (the transport's view): who is live.
    health: Arc<PeerHealth>,
    /// Set once this node was removed: why, and since when.
    removed: Option<(String, Instant)>,
    /// A removed leader hands over to this voter, outside Ready handling.
    hand_over_to: Option<u64>,
    last_promote_check: Instant,
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

/// What the driver shares with the rest of the node.
pub struct Shared {
    pub state: Arc<StateMachine>,
    pub members: Arc<MemberBook>,
    pub health: Arc<PeerHealth>,
    pub proposals: Arc<Proposals>,
    pub progress: Arc<Mutex<RaftProgress>>,
}

impl Driver {
    pub fn new(
        config: &NodeConfig,
        storage: RaftStorage,
        shared: Shared,
        inbox: mpsc::Receiver<DriverMsg>,
        outbox: Box<dyn Fn(Vec<Message>) + Send>,
    ) -> anyhow::Result<Self> {
        let Shared {
            state,
            members,
            health,
            proposals,
            progress,
        } = shared;
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
            members,
            health,
            removed: None,
            hand_over_to: None,
            last_promote_check: Instant::now(),
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
            if let Some(to) = self.hand_over_to.take() {
                self.raw.transfer_leader(to);
                self.on_ready()?;
            }
            self.maybe_promote();
            self.publish_progress();
            if let Some((why, since)) = &self.removed {
                let handed_over = self.raw.raft.state != StateRole::Leader;
                if since.elapsed() >= LINGER_AFTER_REMOVAL
                    || (handed_over && since.elapsed() >= LINGER_AFTER_REMOVAL / 4)
                {
                    anyhow::bail!("{why}");
                }
            }
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
            DriverMsg::ChangeMember(change) => self.propose_change(change),
            DriverMsg::Removed(why) => {
                if self.removed.is_none() {
                    self.removed = Some((removed_message(self.raw.raft.id, &why), Instant::now()));
                }
            }
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
        self.members.refresh(&self.state)?;
        self.proposals
            .resolve_covered(self.raw.raft.id, &self.state);
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> anyhow::Result<()> {
        for entry in entries {
            if matches!(
                entry.get_entry_type(),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2
            ) {
                self.apply_conf_change(&entry)?;
                continue;
            }
            if entry.data.is_empty() {
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

    /// Checks a membership change against the configuration and the
    /// members, and proposes it; a refusal goes straight back to the caller.
    fn propose_change(&mut self, change: pb::MemberChange) {
        let request_id = change.request_id;
        let refused = if self.raw.raft.state != StateRole::Leader {
            Some("this node is no longer the leader; nothing was changed, try again".to_string())
        } else if self.raw.raft.has_pending_conf() {
            Some(
                "another membership change is in progress (still being applied); nothing was changed, \
                 try again in a moment"
                    .to_string(),
            )
        } else {
            self.refusal(&change)
                .and_then(|()| self.leaves_a_live_majority(&change))
                .and_then(|()| self.not_self_removal(&change))
                .err()
        };
        if let Some(why) = refused {
            self.proposals.resolve(request_id, Outcome::Refused(why));
            return;
        }
        let cc = conf_change_of(&change);
        if let Err(e) = self.raw.propose_conf_change(change.encode_to_vec(), cc) {
            self.proposals.resolve(
                request_id,
                Outcome::Refused(format!(
                    "the change was not proposed ({e}); nothing was changed"
                )),
            );
        }
    }

    /// Whether `change` may apply to the current members. Deterministic:
    /// every node decides the same when it applies the entry.
    fn refusal(&self, change: &pb::MemberChange) -> Result<(), String> {
        let id = change.node_id;
        let conf = self.raw.raft.prs().conf();
        let is_voter = conf.voters().contains(id);
        let is_learner = conf.learners().contains(&id);
        match change.kind() {
            pb::MemberChangeKind::AddLearner => {
                if self.members.is_removed(id) {
                    return Err(format!(
                        "node {id} was removed from the cluster, and ids are never reused: \
                         add the host under a new id"
                    ));
                }
                if self.members.contains(id) || is_voter || is_learner {
                    return Err(format!("node {id} is already a member"));
                }
                if id == 0 {
                    return Err("member ids are positive integers".into());
                }
                if !change.addr.contains(':') {
                    return Err(format!("{:?} is not HOST:PORT", change.addr));
                }
            }
            pb::MemberChangeKind::Join => {
                return Err("a claim is not a configuration change".into());
            }
            pb::MemberChangeKind::Promote => {
                if !is_learner {
                    return Err(format!("node {id} is not a learner"));
                }
            }
            pb::MemberChangeKind::Remove => {
                if !is_voter && !is_learner {
                    return Err(format!("node {id} is not a member"));
                }
                if is_voter && conf.voters().ids().len() == 1 {
                    return Err(format!("node {id} is the last voter; it cannot be removed"));
                }
            }
        }
        Ok(())
    }

    /// A leader never removes itself: raft-rs leaves a removed leader in
    /// charge without its own progress, which it then needs. It hands over
    /// to the voter furthest along instead, and its caller asks again.
    fn not_self_removal(&mut self, change: &pb::MemberChange) -> Result<(), String> {
        let me = self.raw.raft.id;
        if change.kind() != pb::MemberChangeKind::Remove || change.node_id != me {
            return Ok(());
        }
        // One transfer at a time: raft-rs drops proposals while one is
        // pending, and re-arming it would keep it pending.
        if self.raw.raft.lead_transferee.is_none() {
            self.hand_over_to = self.best_other_voter();
        }
        Err(HANDING_OVER.to_string())
    }

    fn best_other_voter(&self) -> Option<u64> {
        let raft = &self.raw.raft;
        raft.prs()
            .iter()
            .filter(|(id, _)| **id != raft.id && raft.prs().conf().voters().contains(**id))
            .filter(|(id, _)| self.health.reachable(**id))
            .max_by_key(|(_, pr)| pr.matched)
            .map(|(id, _)| *id)
    }

    /// A removal must leave a majority of the remaining voters reachable, or
    /// the cluster would stop at once (removing a live node while another
    /// is down). Checked on the leader before proposing, not when applying:
    /// reachability is not the same on every node.
    fn leaves_a_live_majority(&self, change: &pb::MemberChange) -> Result<(), String> {
        if change.kind() != pb::MemberChangeKind::Remove {
            return Ok(());
        }
        let raft = &self.raw.raft;
        let prs = raft.prs();
        let remaining: Vec<u64> = prs
            .conf()
            .voters()
            .ids()
            .iter()
            .filter(|&v| v != change.node_id)
            .collect();
        let live: Vec<u64> = remaining
            .iter()
            .copied()
            .filter(|&v| v == raft.id || self.health.reachable(v))
            .collect();
        if live.len() * 2 <= remaining.len() {
            return Err(format!(
                "removing node {} would leave voters {remaining:?}, of which only {live:?} \
                 answer: not a majority; nothing was changed (bring a member back first)",
                change.node_id
            ));
        }
        Ok(())
    }

    /// A committed configuration change: raft's configuration first, then
    /// the state (addresses, tombstones, replicas), then who is told.
    fn apply_conf_change(&mut self, entry: &Entry) -> anyhow::Result<()> {
        let cc = match entry.get_entry_type() {
            EntryType::EntryConfChange => {
                let mut v1 = ConfChange::default();
                protobuf::Message::merge_from_bytes(&mut v1, &entry.data)?;
                v1.into_v2()
            }
            _ => {
                let mut v2 = ConfChangeV2::default();
                protobuf::Message::merge_from_bytes(&mut v2, &entry.data)?;
                v2
            }
        };
        let change = match pb::MemberChange::decode(&entry.context[..]) {
            Ok(c) if conf_change_of(&c) == cc => c,
            _ => {
                tracing::error!(
                    index = entry.index,
                    "configuration entry without its change skipped"
                );
                self.state.skip(entry.index)?;
                return Ok(());
            }
        };
        if entry.index <= self.raw.store().conf_index()? {
            // Replayed after a crash that kept the configuration but not the
            // state: raft already started from the new configuration, and
            // the state must still record the change.
            self.state.apply_member_change(entry.index, &change)?;
            self.members.refresh(&self.state)?;
            return self.on_member_changed(&change);
        }
        let outcome = match self.refusal(&change) {
            Err(why) => Outcome::Refused(format!("{why}; nothing was changed")),
            Ok(()) => match self.raw.apply_conf_change(&cc) {
                Err(e) => Outcome::Refused(format!(
                    "raft refused the change ({e}); nothing was changed"
                )),
                Ok(cs) => {
                    self.raw.store().set_conf_state(&cs, entry.index)?;
                    self.state.apply_member_change(entry.index, &change)?;
                    self.members.refresh(&self.state)?;
                    tracing::info!(
                        index = entry.index,
                        change = ?change.kind(),
                        node = change.node_id,
                        voters = ?cs.voters,
                        learners = ?cs.learners,
                        "membership changed"
                    );
                    Outcome::Done
                }
            },
        };
        if matches!(outcome, Outcome::Refused(_)) {
            self.state.skip(entry.index)?;
        }
        let applied = matches!(outcome, Outcome::Done);
        if change.origin_node == self.raw.raft.id {
            self.proposals.resolve(change.request_id, outcome);
        }
        if applied {
            self.on_member_changed(&change)?;
        }
        Ok(())
    }

    /// This node was removed: it stops, after a moment to let its replies
    /// out, or at once if it leads (the leader that applies its own removal
    /// has no progress of its own left, which raft-rs would then need; it
    /// gets here only if it won an election with the removal in its log).
    fn on_member_changed(&mut self, change: &pb::MemberChange) -> anyhow::Result<()> {
        let me = self.raw.raft.id;
        if change.kind() != pb::MemberChangeKind::Remove || change.node_id != me {
            return Ok(());
        }
        let why = removed_message(me, "this node applied its own removal");
        if self.raw.raft.state == StateRole::Leader {
            self.raw.store().flush()?;
            anyhow::bail!("{why}");
        }
        self.removed = Some((why, Instant::now()));
        Ok(())
    }

    /// The leader promotes a learner that has caught up, if the cluster
    /// would still have a reachable majority with it as a voter.
    fn maybe_promote(&mut self) {
        if self.last_promote_check.elapsed() < PROMOTE_CHECK_EVERY {
            return;
        }
        self.last_promote_check = Instant::now();
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader || raft.has_pending_conf() || self.removed.is_some() {
            return;
        }
        let last = raft.raft_log.last_index();
        let prs = raft.prs();
        let conf = prs.conf();
        let voters: Vec<u64> = conf.voters().ids().iter().collect();
        let active_voters = voters
            .iter()
            .filter(|&&v| v == raft.id || self.health.reachable(v))
            .count();
        let ready =
            conf.learners().iter().copied().find(|&l| {
                self.health.reachable(l) && prs.get(l).is_some_and(|p| caught_up(p, last))
            });
        let Some(learner) = ready else { return };
        if (active_voters + 1) * 2 <= voters.len() + 1 {
            return;
        }
        let change = pb::MemberChange {
            origin_node: raft.id,
            request_id: 0,
            kind: pb::MemberChangeKind::Promote as i32,
            node_id: learner,
            addr: String::new(),
        };
        tracing::info!(
            node = learner,
            matched = prs.get(learner).map(|p| p.matched),
            last,
            "promoting a learner that caught up"
        );
        let cc = conf_change_of(&change);
        if let Err(e) = self.raw.propose_conf_change(change.encode_to_vec(), cc) {
            tracing::debug!(error = %e, "promotion not proposed");
        }
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
            voters: raft.prs().conf().voters().ids().iter().collect(),
            learners: raft.prs().conf().learners().iter().copied().collect(),
            last_index: raft.raft_log.last_index(),
            matched: if raft.state == StateRole::Leader {
                raft.prs()
                    .iter()
                    .map(|(&id, pr)| (id, pr.matched))
                    .collect()
            } else {
                Default::default()
            },
        };
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }
}

/// A learner's log is the leader's, or close to it, for real: it is being
/// replicated to (not waiting for a snapshot) and within PROMOTE_WITHIN of
/// `last`; or it holds all of it. A learner that held all of it and then
/// missed a message (one send over its deadline) is probed again, and raft
/// leaves it so until the next entry, which may not come for a long time.
fn caught_up(p: &raft::Progress, last: u64) -> bool {
    p.matched > 0
        && match p.state {
            ProgressState::Replicate => p.matched + PROMOTE_WITHIN >= last,
            ProgressState::Probe => p.matched >= last,
            ProgressState::Snapshot => false,
        }
}

/// The raft change a membership change stands for: one step each, so no
/// joint configuration is ever needed (adding a learner does not change the
/// quorum; a promotion or a removal changes it by one voter).
fn conf_change_of(change: &pb::MemberChange) -> ConfChangeV2 {
    let change_type = match change.kind() {
        pb::MemberChangeKind::AddLearner => ConfChangeType::AddLearnerNode,
        pb::MemberChangeKind::Promote => ConfChangeType::AddNode,
        pb::MemberChangeKind::Remove => ConfChangeType::RemoveNode,
        // Not a configuration change (a normal command carries claims);
        // refused before it gets here.
        pb::MemberChangeKind::Join => ConfChangeType::AddLearnerNode,
    };
    let mut single = ConfChangeSingle::default();
    single.set_change_type(change_type);
    single.node_id = change.node_id;
    let mut cc = ConfChangeV2::default();
    cc.set_changes(vec![single].into());
    cc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_learner_is_caught_up_when_replicated_to_closely_or_probed_holding_everything() {
        let last = 1000;
        let progress = |state: ProgressState, matched: u64| {
            let mut p = raft::Progress::new(matched + 1, 256);
            p.matched = matched;
            p.state = state;
            p
        };
        assert!(caught_up(&progress(ProgressState::Replicate, last), last));
        assert!(caught_up(
            &progress(ProgressState::Replicate, last - PROMOTE_WITHIN),
            last
        ));
        assert!(!caught_up(
            &progress(ProgressState::Replicate, last - PROMOTE_WITHIN - 1),
            last
        ));
        // Held everything, then one send failed: probed, and nothing new to
        // send that would make raft replicate to it again.
        assert!(caught_up(&progress(ProgressState::Probe, last), last));
        assert!(!caught_up(&progress(ProgressState::Probe, last - 1), last));
        assert!(!caught_up(&progress(ProgressState::Snapshot, last), last));
        assert!(!caught_up(&progress(ProgressState::Replicate, 0), 0));
    }
}
