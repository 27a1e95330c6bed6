//! The replicated state machine: groups, their replicas and their consensus
//! refs, in one sled tree. It is deterministic — the same log gives the same
//! state on every node — and knows nothing of terms, peers or git.
//!
//! Each applied command is written in one sled batch together with the
//! applied index, so after a crash the state and the index that describes it
//! never disagree. Reads that span several keys (a group, a snapshot) take a
//! read lock that `apply` excludes, so they never see half a command.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use piehole_protocol::pb::{self, command::Op};
use piehole_protocol::validate;
use prost::Message as _;
use tokio::sync::broadcast;

use crate::disk::Disk;
use crate::ref_rule::{self, Cas, RefView};

const APPLIED: &[u8] = b"applied";
const RESTORED_FROM: &[u8] = b"restored_from";
const GROUP: u8 = b'g';
const REF: u8 = b'r';
const REPLICA: u8 = b'p';
/// group -> version, bumped by every change of the group's refs.
const VERSION: u8 = b'v';
/// (origin node, request id) -> AppliedRequest
const DEDUP: u8 = b'd';
/// applied index -> DEDUP key, to forget in log order
const DEDUP_BY_INDEX: u8 = b'x';
/// member id -> pb::ClusterMember: its peer address, or that it was removed
/// (ids are never reused, so a removed member stays as a tombstone).
const MEMBER: u8 = b'm';

fn member_key(id: u64) -> Vec<u8> {
    let mut k = vec![MEMBER, 0];
    k.extend_from_slice(&id.to_be_bytes());
    k
}
/// How many log entries a request is remembered for. A copy of a proposal
/// applied later than this after the proposal was made is refused instead
/// (see `Command.proposed_after`), so no copy can ever apply twice.
pub const DEDUP_WINDOW: u64 = 10_000;

fn dedup_key(origin: u64, request: u64) -> Vec<u8> {
    let mut k = vec![DEDUP, 0];
    k.extend_from_slice(&origin.to_be_bytes());
    k.extend_from_slice(&request.to_be_bytes());
    k
}

fn dedup_index_key(index: u64) -> Vec<u8> {
    let mut k = vec![DEDUP_BY_INDEX, 0];
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn insert_seen(batch: &mut sled::Batch, seen: &pb::AppliedRequest) {
    let k = dedup_key(seen.origin_node, seen.request_id);
    batch.insert(dedup_index_key(seen.index), k.clone());
    batch.insert(k, seen.encode_to_vec());
}

fn outcome_to(o: &Outcome) -> pb::StoredOutcome {
    match o {
        Outcome::Push(refs) => pb::StoredOutcome {
            push: true,
            refs: refs
                .iter()
                .map(|r| pb::RefOutcome {
                    applied: r.applied,
                    current: r.current.clone().unwrap_or_default(),
                    blocked_by: r.blocked_by.clone().unwrap_or_default(),
                })
                .collect(),
            refused: String::new(),
        },
        Outcome::Done => pb::StoredOutcome::default(),
        Outcome::Refused(why) => pb::StoredOutcome {
            refused: why.clone(),
            ..Default::default()
        },
    }
}

fn outcome_from(o: pb::StoredOutcome) -> Outcome {
    if o.push {
        Outcome::Push(
            o.refs
                .into_iter()
                .map(|r| RefOutcome {
                    applied: r.applied,
                    current: (!r.current.is_empty()).then_some(r.current),
                    blocked_by: (!r.blocked_by.is_empty()).then_some(r.blocked_by),
                })
                .collect(),
        )
    } else if !o.refused.is_empty() {
        Outcome::Refused(o.refused)
    } else {
        Outcome::Done
    }
}

/// What one ref's compare-and-swap did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RefOutcome {
    pub applied: bool,
    /// The value after the operation; the winner's when not applied.
    pub current: Option<String>,
    /// Not applied because this existing ref is in the way (a ref cannot be
    /// both a file and a directory: refs/heads/a vs refs/heads/a/b).
    pub blocked_by: Option<String>,
}

/// What a command did, handed back to whoever proposed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// One per update of the push, in order.
    Push(Vec<RefOutcome>),
    Done,
    Refused(String),
}

/// A consensus ref and the node whose proposal set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefValue {
    pub value: String,
    pub proposer: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupView {
    pub refs: BTreeMap<String, RefValue>,
    /// node id -> repository path on that node's host
    pub replicas: BTreeMap<u64, String>,
    /// Bumped by every change of the group's refs: a decision taken on this
    /// view can be made conditional on nothing having changed since.
    pub version: u64,
}

impl GroupView {
    /// The group on the wire: in snapshots, exports and read replies.
    pub fn into_group_state(self, name: String) -> pb::GroupState {
        pb::GroupState {
            name,
            version: self.version,
            replicas: self
                .replicas
                .into_iter()
                .map(|(node_id, path)| pb::Replica { node_id, path })
                .collect(),
            refs: self
                .refs
                .into_iter()
                .map(|(ref_name, v)| pb::ConsensusRef {
                    ref_name,
                    value: v.value,
                    proposer: v.proposer,
                })
                .collect(),
        }
    }
}

pub struct StateMachine {
    tree: sled::Tree,
    /// Made durable at once after a snapshot install, which no log replays.
    disk: Arc<Disk>,
    /// Held for writing while a command is applied, for reading by every
    /// read of more than one key.
    consistent: RwLock<()>,
    /// Names of groups whose refs or replicas changed; the replicator listens.
    changes: broadcast::Sender<String>,
}

fn key(kind: u8, group: &str, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + group.len() + 1 + rest.len());
    k.push(kind);
    k.push(0);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(rest);
    k
}

fn group_prefix(kind: u8, group: &str) -> Vec<u8> {
    key(kind, group, b"")
}

impl StateMachine {
    pub fn open(disk: Arc<Disk>) -> anyhow::Result<Self> {
        let (changes, _) = broadcast::channel(1024);
        Ok(StateMachine {
            tree: disk.db().open_tree("state")?,
            disk,
            consistent: RwLock::new(()),
            changes,
        })
    }

    fn reading(&self) -> RwLockReadGuard<'_, ()> {
        self.consistent.read().unwrap_or_else(|e| e.into_inner())
    }

    fn writing(&self) -> RwLockWriteGuard<'_, ()> {
        self.consistent.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    pub fn applied(&self) -> u64 {
        match self.tree.get(APPLIED) {
            Ok(Some(b)) if b.len() == 8 => {
                u64::from_be_bytes(b.as_ref().try_into().unwrap_or([0; 8]))
            }
            _ => 0,
        }
    }

    /// Records that `index` was applied without changing anything (empty
    /// entries a new leader appends, configuration entries).
    pub fn skip(&self, index: u64) -> anyhow::Result<()> {
        let _w = self.writing();
        self.tree.insert(APPLIED, &index.to_be_bytes())?;
        Ok(())
    }

    /// Applies one committed command at log position `index`.
    pub fn apply(&self, index: u64, cmd: &pb::Command) -> anyhow::Result<Outcome> {
        let _w = self.writing();
        let mut batch = sled::Batch::default();
        batch.insert(APPLIED, &index.to_be_bytes());
        let mutates = !matches!(cmd.op, Some(Op::Read(_)) | None);
        if mutates {
            self.forget_before(&mut batch, index)?;
            if let Some(seen) = self.tree.get(dedup_key(cmd.origin_node, cmd.request_id))? {
                // A second copy of a proposal already applied: answer as the
                // first time, change nothing (it could undo later updates).
                self.tree.apply_batch(batch)?;
                let seen = pb::AppliedRequest::decode(seen.as_ref())?;
                return Ok(outcome_from(seen.outcome.unwrap_or_default()));
            }
            if index.saturating_sub(cmd.proposed_after) > DEDUP_WINDOW {
                // An earlier copy may have applied and been forgotten.
                self.tree.apply_batch(batch)?;
                return Ok(Outcome::Refused(
                    "the update came back too late to be applied safely; nothing was changed"
                        .into(),
                ));
            }
        }
        // The log is not trusted for being the log: a peer holding the
        // secret can put anything in it. Every node refuses the same bad
        // command the same way, so the states stay equal.
        let invalid = if mutates {
            validate::command(cmd).err()
        } else {
            None
        };
        let (outcome, changed) = match &cmd.op {
            _ if invalid.is_some() => (
                Outcome::Refused(format!(
                    "{}; nothing was changed",
                    invalid
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default()
                )),
                None,
            ),
            Some(Op::Register(r)) if self.is_removed(r.node_id)? => (
                Outcome::Refused(format!(
                    "node {} was removed from the cluster; nothing was changed",
                    r.node_id
                )),
                None,
            ),
            Some(Op::Register(r)) => {
                batch.insert(group_prefix(GROUP, &r.group), b"");
                batch.insert(
                    key(REPLICA, &r.group, &r.node_id.to_be_bytes()),
                    r.path.as_bytes(),
                );
                (Outcome::Done, Some(&r.group))
            }
            Some(Op::Push(p)) => {
                let outcome = self.push(&mut batch, p)?;
                (outcome, Some(&p.group))
            }
            Some(Op::Clobber(c)) => {
                let version = self.version_unlocked(&c.group)?;
                if c.expected_version != version {
                    (
                        Outcome::Refused(
                            "the group changed while clobber ran (a push landed); \
                             nothing was changed, run it again"
                                .into(),
                        ),
                        None,
                    )
                } else {
                    batch.insert(group_prefix(GROUP, &c.group), b"");
                    for old in self.tree.scan_prefix(group_prefix(REF, &c.group)) {
                        batch.remove(old?.0);
                    }
                    for r in &c.refs {
                        batch.insert(
                            key(REF, &c.group, r.ref_name.as_bytes()),
                            encode_ref(&r.value, c.proposer),
                        );
                    }
                    batch.insert(
                        group_prefix(VERSION, &c.group),
                        &(version + 1).to_be_bytes(),
                    );
                    (Outcome::Done, Some(&c.group))
                }
            }
            Some(Op::Claim(c)) => (self.claim(&mut batch, c)?, None),
            Some(Op::Read(_)) => (Outcome::Done, None),
            None => (Outcome::Refused("empty command".into()), None),
        };
        if mutates {
            insert_seen(
                &mut batch,
                &pb::AppliedRequest {
                    origin_node: cmd.origin_node,
                    request_id: cmd.request_id,
                    index,
                    outcome: Some(outcome_to(&outcome)),
                },
            );
        }
        self.tree.apply_batch(batch)?;
        if let Some(group) = changed {
            // Nobody listening is fine: the replicator also reconciles periodically.
            let _ = self.changes.send(group.clone());
        }
        Ok(outcome)
    }

    /// The first data dir to start under an added id owns it; another one
    /// (the same host wiped, a copy) is refused.
    fn claim(&self, batch: &mut sled::Batch, c: &pb::ClaimOp) -> anyhow::Result<Outcome> {
        let Some(v) = self.tree.get(member_key(c.node_id))? else {
            return Ok(Outcome::Refused(format!(
                "node {} is not a member: run `piehole member add {}=HOST:PORT` on a member first",
                c.node_id, c.node_id
            )));
        };
        let mut m = pb::ClusterMember::decode(v.as_ref())?;
        if m.removed {
            return Ok(Outcome::Refused(format!(
                "node {} was removed from the cluster; ids are never reused",
                c.node_id
            )));
        }
        if m.claim == c.nonce {
            return Ok(Outcome::Done);
        }
        if m.claim != 0 || c.nonce == 0 {
            return Ok(Outcome::Refused(format!(
                "node {} has already started with another data dir: this one is empty, so \
                 that node's data was lost, and it must not vote again under its old id",
                c.node_id
            )));
        }
        m.claim = c.nonce;
        batch.insert(member_key(m.id), m.encode_to_vec());
        Ok(Outcome::Done)
    }

    fn is_removed(&self, id: u64) -> anyhow::Result<bool> {
        Ok(match self.tree.get(member_key(id))? {
            Some(v) => pb::ClusterMember::decode(v.as_ref())?.removed,
            None => false,
        })
    }

    /// Every member ever known, removed ones included.
    pub fn members(&self) -> anyhow::Result<BTreeMap<u64, pb::ClusterMember>> {
        let mut out = BTreeMap::new();
        for kv in self.tree.scan_prefix([MEMBER, 0]) {
            let m = pb::ClusterMember::decode(kv?.1.as_ref())?;
            out.insert(m.id, m);
        }
        Ok(out)
    }

    /// The members a cluster starts from, at `index` (the bootstrap point,
    /// or nothing yet for a joining node, whose snapshot replaces them).
    pub fn seed_members(&self, index: u64, members: &[pb::ClusterMember]) -> anyhow::Result<()> {
        let _w = self.writing();
        let mut batch = sled::Batch::default();
        batch.insert(APPLIED, &index.to_be_bytes());
        for m in members {
            batch.insert(member_key(m.id), m.encode_to_vec());
        }
        self.tree.apply_batch(batch)?;
        self.disk.sync()
    }

    /// Records a membership change that raft applied at `index`. A removed
    /// member's replicas are dropped with it: nothing may fetch from them.
    pub fn apply_member_change(&self, index: u64, change: &pb::MemberChange) -> anyhow::Result<()> {
        let _w = self.writing();
        let mut batch = sled::Batch::default();
        batch.insert(APPLIED, &index.to_be_bytes());
        let mut changed = Vec::new();
        match change.kind() {
            pb::MemberChangeKind::AddLearner => {
                let m = pb::ClusterMember {
                    id: change.node_id,
                    addr: change.addr.clone(),
                    removed: false,
                    claim: 0,
                };
                batch.insert(member_key(m.id), m.encode_to_vec());
            }
            pb::MemberChangeKind::Promote | pb::MemberChangeKind::Join => {}
            pb::MemberChangeKind::Remove => {
                let mut m = match self.tree.get(member_key(change.node_id))? {
                    Some(v) => pb::ClusterMember::decode(v.as_ref())?,
                    None => pb::ClusterMember {
                        id: change.node_id,
                        ..Default::default()
                    },
                };
                m.removed = true;
                batch.insert(member_key(m.id), m.encode_to_vec());
                for group in self.groups_unlocked() {
                    let k = key(REPLICA, &group, &change.node_id.to_be_bytes());
                    if self.tree.contains_key(&k)? {
                        batch.remove(k);
                        changed.push(group);
                    }
                }
            }
        }
        self.tree.apply_batch(batch)?;
        for g in changed {
            let _ = self.changes.send(g);
        }
        Ok(())
    }

    /// Forgets every request applied more than DEDUP_WINDOW entries before
    /// `index`, so the table stays bounded and every node forgets the same.
    fn forget_before(&self, batch: &mut sled::Batch, index: u64) -> anyhow::Result<()> {
        let Some(horizon) = index.checked_sub(DEDUP_WINDOW) else {
            return Ok(());
        };
        let old = self
            .tree
            .range(dedup_index_key(0)..dedup_index_key(horizon));
        for kv in old {
            let (k, request) = kv?;
            batch.remove(request);
            batch.remove(k);
        }
        Ok(())
    }

    /// One push, decided by [`ref_rule::decide`] on this state.
    fn push(&self, batch: &mut sled::Batch, p: &pb::PushOp) -> anyhow::Result<Outcome> {
        let updates: Vec<Cas> = p
            .updates
            .iter()
            .map(|u| Cas {
                name: &u.ref_name,
                expected: &u.expected,
                new: &u.new,
            })
            .collect();
        let view = SledRefs {
            tree: &self.tree,
            group: &p.group,
        };
        let decision = ref_rule::decide(&updates, p.atomic, &view)?;
        if !decision.moves.is_empty() {
            batch.insert(group_prefix(GROUP, &p.group), b"");
            let version = self.version_unlocked(&p.group)? + 1;
            batch.insert(group_prefix(VERSION, &p.group), &version.to_be_bytes());
        }
        for i in decision.moves {
            let u = &p.updates[i];
            let k = key(REF, &p.group, u.ref_name.as_bytes());
            if u.new.is_empty() {
                batch.remove(k);
            } else {
                batch.insert(k, encode_ref(&u.new, p.proposer));
            }
        }
        Ok(Outcome::Push(decision.outcomes))
    }

    fn version_unlocked(&self, group: &str) -> anyhow::Result<u64> {
        Ok(match self.tree.get(group_prefix(VERSION, group))? {
            Some(b) if b.len() == 8 => u64::from_be_bytes(b.as_ref().try_into()?),
            _ => 0,
        })
    }

    pub fn groups(&self) -> Vec<String> {
        let _r = self.reading();
        self.groups_unlocked()
    }

    fn groups_unlocked(&self) -> Vec<String> {
        self.tree
            .scan_prefix([GROUP, 0])
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| String::from_utf8_lossy(&k[2..k.len() - 1]).into_owned())
            .collect()
    }

    /// The outcome of a request this state remembers having applied.
    pub fn seen(&self, origin: u64, request: u64) -> Option<Outcome> {
        let v = self.tree.get(dedup_key(origin, request)).ok()??;
        let seen = pb::AppliedRequest::decode(v.as_ref()).ok()?;
        Some(outcome_from(seen.outcome.unwrap_or_default()))
    }

    /// How many requests the dedup memory holds (bounded by DEDUP_WINDOW).
    pub fn remembered(&self) -> usize {
        self.tree.scan_prefix([DEDUP, 0]).count()
    }

    /// One consensus ref's value, as applied here.
    pub fn ref_value(&self, group: &str, ref_name: &str) -> Option<String> {
        let _r = self.reading();
        self.ref_value_unlocked(group, ref_name)
    }

    fn ref_value_unlocked(&self, group: &str, ref_name: &str) -> Option<String> {
        let v = self.tree.get(key(REF, group, ref_name.as_bytes())).ok()??;
        Some(decode_ref(&v).value)
    }

    /// Every (group, path) that `node_id` hosts, without reading any refs:
    /// this runs on every hook call.
    pub fn hosted_by(&self, node_id: u64) -> BTreeMap<String, String> {
        let _r = self.reading();
        let mut out = BTreeMap::new();
        for (k, v) in self.tree.scan_prefix([REPLICA, 0]).filter_map(|kv| kv.ok()) {
            // key: 'p' 0 group 0 node_id(8)
            if k.len() < 2 + 1 + 8 || k[k.len() - 8..] != node_id.to_be_bytes() {
                continue;
            }
            let group = String::from_utf8_lossy(&k[2..k.len() - 9]).into_owned();
            out.insert(group, String::from_utf8_lossy(&v).into_owned());
        }
        out
    }

    /// A group's refs and replicas, as of one applied index.
    pub fn group(&self, group: &str) -> anyhow::Result<GroupView> {
        let _r = self.reading();
        self.group_unlocked(group)
    }

    fn group_unlocked(&self, group: &str) -> anyhow::Result<GroupView> {
        let mut view = GroupView::default();
        let prefix = group_prefix(REF, group);
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            view.refs.insert(name, decode_ref(&v));
        }
        let prefix = group_prefix(REPLICA, group);
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let id = u64::from_be_bytes(k[prefix.len()..].try_into()?);
            view.replicas
                .insert(id, String::from_utf8_lossy(&v).into_owned());
        }
        view.version = self.version_unlocked(group)?;
        Ok(view)
    }

    /// Number of groups and of consensus refs, for status.
    pub fn counts(&self) -> (u64, u64) {
        let _r = self.reading();
        let groups = self.tree.scan_prefix([GROUP, 0]).count() as u64;
        let refs = self.tree.scan_prefix([REF, 0]).count() as u64;
        (groups, refs)
    }

    /// What [`StateMachine::restore`] was last given as `origin`, if anything.
    pub fn restored_from(&self) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.tree.get(RESTORED_FROM)?.map(|v| v.to_vec()))
    }

    /// The whole state and the index it reflects, for a Raft snapshot.
    pub fn snapshot(&self) -> anyhow::Result<(u64, Vec<u8>)> {
        let _r = self.reading();
        let applied = self.applied();
        let mut snap = pb::StateSnapshot::default();
        for name in self.groups_unlocked() {
            let view = self.group_unlocked(&name)?;
            snap.groups.push(view.into_group_state(name));
        }
        for kv in self.tree.scan_prefix([DEDUP, 0]) {
            snap.applied_requests
                .push(pb::AppliedRequest::decode(kv?.1.as_ref())?);
        }
        snap.members = self.members()?.into_values().collect();
        Ok((applied, snap.encode_to_vec()))
    }

    /// Replaces the whole state with a snapshot taken at `index`, atomically.
    ///
    /// `origin` is stored with it, opaque to us: the consensus layer's own
    /// description of the snapshot, so that after a crash between restoring
    /// the state and truncating the log it can finish the job.
    pub fn restore(&self, index: u64, data: &[u8], origin: &[u8]) -> anyhow::Result<()> {
        let snap = pb::StateSnapshot::decode(data)?;
        validate::snapshot(&snap)?;
        let _w = self.writing();
        let mut batch = sled::Batch::default();
        for k in self.tree.iter().keys() {
            batch.remove(k?);
        }
        batch.insert(APPLIED, &index.to_be_bytes());
        batch.insert(RESTORED_FROM, origin);
        for g in &snap.groups {
            batch.insert(group_prefix(GROUP, &g.name), b"");
            if g.version != 0 {
                batch.insert(group_prefix(VERSION, &g.name), &g.version.to_be_bytes());
            }
            for r in &g.replicas {
                batch.insert(
                    key(REPLICA, &g.name, &r.node_id.to_be_bytes()),
                    r.path.as_bytes(),
                );
            }
            for r in &g.refs {
                batch.insert(
                    key(REF, &g.name, r.ref_name.as_bytes()),
                    encode_ref(&r.value, r.proposer),
                );
            }
        }
        for seen in &snap.applied_requests {
            insert_seen(&mut batch, seen);
        }
        for m in &snap.members {
            batch.insert(member_key(m.id), m.encode_to_vec());
        }
        self.tree.apply_batch(batch)?;
        // No log holds what a snapshot brought: it must be on disk before
        // anyone reads it (and moves a replica's ref on its word), or a crash
        // now would bring back the older state under a newer ref.
        self.disk.sync()?;
        drop(_w);
        for g in snap.groups {
            let _ = self.changes.send(g.name);
        }
        Ok(())
    }
}

/// One group's refs in the tree, as the rule reads them.
struct SledRefs<'a> {
    tree: &'a sled::Tree,
    group: &'a str,
}

impl RefView for SledRefs<'_> {
    fn value(&self, name: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .tree
            .get(key(REF, self.group, name.as_bytes()))?
            .map(|b| decode_ref(&b).value))
    }

    fn child(&self, dir: &str, skip: &BTreeSet<String>) -> anyhow::Result<Option<String>> {
        let prefix_len = group_prefix(REF, self.group).len();
        for kv in self.tree.scan_prefix(key(REF, self.group, dir.as_bytes())) {
            let (k, _) = kv?;
            let child = String::from_utf8_lossy(&k[prefix_len..]).into_owned();
            if !skip.contains(&child) {
                return Ok(Some(child));
            }
        }
        Ok(None)
    }
}

fn encode_ref(value: &str, proposer: u64) -> Vec<u8> {
    let mut v = proposer.to_be_bytes().to_vec();
    v.extend_from_slice(value.as_bytes());
    v
}

fn decode_ref(bytes: &[u8]) -> RefValue {
    let (p, v) = bytes.split_at(8.min(bytes.len()));
    RefValue {
        proposer: u64::from_be_bytes(p.try_into().unwrap_or([0; 8])),
        value: String::from_utf8_lossy(v).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sm() -> (tempfile::TempDir, StateMachine) {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(Disk::open(&dir.path().join("db")).unwrap());
        let sm = StateMachine::open(disk).unwrap();
        (dir, sm)
    }

    fn next_request() -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(100);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// A push of `updates` (ref, expected, new), a distinct proposal each call.
    fn push(group: &str, updates: &[(&str, &str, &str)], atomic: bool) -> pb::Command {
        pb::Command {
            origin_node: 1,
            request_id: next_request(),
            op: Some(Op::Push(pb::PushOp {
                group: group.into(),
                updates: updates
                    .iter()
                    .map(|(r, e, n)| pb::RefCas {
                        ref_name: r.to_string(),
                        expected: e.to_string(),
                        new: n.to_string(),
                    })
                    .collect(),
                atomic,
                proposer: 1,
            })),
            proposed_after: 0,
        }
    }

    fn cas(group: &str, r: &str, expected: &str, new: &str) -> pb::Command {
        push(group, &[(r, expected, new)], false)
    }

    fn one(applied: bool, current: Option<&str>) -> Outcome {
        Outcome::Push(vec![out(applied, current)])
    }

    fn out(applied: bool, current: Option<&str>) -> RefOutcome {
        RefOutcome {
            applied,
            current: current.map(String::from),
            blocked_by: None,
        }
    }

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccccccccccccccccccccccccccc";

    #[test]
    fn cas_create_move_conflict_delete_and_repeat() {
        let (_d, sm) = sm();
        let r = "refs/heads/main";
        assert_eq!(
            sm.apply(1, &cas("g", r, "", A)).unwrap(),
            one(true, Some(A))
        );
        assert_eq!(sm.apply(2, &cas("g", r, A, B)).unwrap(), one(true, Some(B)));
        // Conflict reports the winner and changes nothing.
        assert_eq!(
            sm.apply(3, &cas("g", r, A, A)).unwrap(),
            one(false, Some(B))
        );
        // A repeated CAS whose target is already the value succeeds without change.
        assert_eq!(sm.apply(4, &cas("g", r, A, B)).unwrap(), one(true, Some(B)));
        assert_eq!(sm.apply(5, &cas("g", r, B, "")).unwrap(), one(true, None));
        assert!(sm.group("g").unwrap().refs.is_empty());
        assert_eq!(sm.applied(), 5);
    }

    #[test]
    fn an_atomic_push_moves_every_ref_or_none() {
        let (_d, sm) = sm();
        let (x, y) = ("refs/heads/x", "refs/heads/y");
        sm.apply(1, &cas("g", y, "", C)).unwrap();
        // y expected absent but is C: nothing moves, and x reports its value.
        let out = sm
            .apply(2, &push("g", &[(x, "", A), (y, "", B)], true))
            .unwrap();
        assert_eq!(
            out,
            Outcome::Push(vec![self::out(false, None), self::out(false, Some(C))])
        );
        assert_eq!(sm.ref_value("g", x), None);
        // The same, not atomic: x moves alone.
        let out = sm
            .apply(3, &push("g", &[(x, "", A), (y, "", B)], false))
            .unwrap();
        assert_eq!(
            out,
            Outcome::Push(vec![self::out(true, Some(A)), self::out(false, Some(C))])
        );
        // Atomic, all expectations right: both move in one entry.
        let out = sm
            .apply(4, &push("g", &[(x, A, B), (y, C, "")], true))
            .unwrap();
        assert_eq!(
            out,
            Outcome::Push(vec![self::out(true, Some(B)), self::out(true, None)])
        );
        assert_eq!(sm.ref_value("g", x).as_deref(), Some(B));
        assert_eq!(sm.ref_value("g", y), None);
    }

    #[test]
    fn a_ref_cannot_be_both_a_file_and_a_directory() {
        let (_d, sm) = sm();
        sm.apply(1, &cas("g", "refs/heads/a", "", A)).unwrap();
        let blocked = |out: Outcome| match out {
            Outcome::Push(o) => o[0].blocked_by.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            blocked(sm.apply(2, &cas("g", "refs/heads/a/b", "", B)).unwrap()).as_deref(),
            Some("refs/heads/a")
        );
        sm.apply(3, &cas("g", "refs/heads/x/y", "", B)).unwrap();
        assert_eq!(
            blocked(sm.apply(4, &cas("g", "refs/heads/x", "", A)).unwrap()).as_deref(),
            Some("refs/heads/x/y")
        );
        assert_eq!(sm.ref_value("g", "refs/heads/x"), None);
        // Deleting the file and creating the directory in one push is fine,
        // as in git; other groups and look-alike names are no obstacle.
        let out = sm
            .apply(
                5,
                &push(
                    "g",
                    &[("refs/heads/a", A, ""), ("refs/heads/a/b", "", B)],
                    true,
                ),
            )
            .unwrap();
        assert_eq!(
            out,
            Outcome::Push(vec![self::out(true, None), self::out(true, Some(B))])
        );
        assert_eq!(
            sm.apply(6, &cas("g", "refs/heads/ab", "", A)).unwrap(),
            one(true, Some(A))
        );
        assert_eq!(
            sm.apply(7, &cas("h", "refs/heads/x", "", A)).unwrap(),
            one(true, Some(A))
        );
    }

    #[test]
    fn a_clobber_decided_on_an_older_version_changes_nothing() {
        let (_d, sm) = sm();
        sm.apply(1, &cas("g", "refs/heads/m", "", A)).unwrap();
        let seen = sm.group("g").unwrap().version;
        assert_eq!(seen, 1);
        // A push lands after the clobber read the group.
        sm.apply(2, &cas("g", "refs/heads/m", A, B)).unwrap();
        let clobber = |version| pb::Command {
            origin_node: 3,
            request_id: next_request(),
            op: Some(Op::Clobber(pb::ClobberOp {
                group: "g".into(),
                refs: vec![],
                proposer: 3,
                expected_version: version,
            })),
            proposed_after: 0,
        };
        assert!(matches!(
            sm.apply(3, &clobber(seen)).unwrap(),
            Outcome::Refused(_)
        ));
        assert_eq!(sm.ref_value("g", "refs/heads/m").as_deref(), Some(B));
        let now = sm.group("g").unwrap().version;
        assert_eq!(sm.apply(4, &clobber(now)).unwrap(), Outcome::Done);
        assert!(sm.group("g").unwrap().refs.is_empty());
        assert_eq!(sm.group("g").unwrap().version, now + 1);
    }

    #[test]
    fn a_second_copy_of_a_proposal_changes_nothing() {
        let (_d, sm) = sm();
        let r = "refs/tags/t";
        let create = cas("g", r, "", A);
        assert_eq!(sm.apply(1, &create).unwrap(), one(true, Some(A)));
        let delete = cas("g", r, A, "");
        assert_eq!(sm.apply(2, &delete).unwrap(), one(true, None));
        // The create arrives again (offered twice): answered as before, not re-applied.
        assert_eq!(sm.apply(3, &create).unwrap(), one(true, Some(A)));
        assert!(sm.group("g").unwrap().refs.is_empty());
        assert_eq!(sm.applied(), 3);
        // And the memory survives a snapshot.
        let (idx, data) = sm.snapshot().unwrap();
        let (_d2, other) = self::sm();
        other.restore(idx, &data, b"").unwrap();
        other.apply(4, &create).unwrap();
        assert!(other.group("g").unwrap().refs.is_empty());
        assert_eq!(other.seen(1, create.request_id), Some(one(true, Some(A))));
        assert_eq!(other.seen(1, u64::MAX), None);
    }

    #[test]
    fn the_dedup_memory_is_bounded_whatever_the_entries() {
        let (_d, sm) = sm();
        let read = |request_id| pb::Command {
            origin_node: 2,
            request_id,
            op: Some(Op::Read(pb::ReadOp {})),
            proposed_after: 0,
        };
        let mut index = 0;
        for i in 0..3 * DEDUP_WINDOW {
            index += 1;
            let mut c = cas("g", "refs/heads/m", "", A);
            c.proposed_after = index - 1;
            sm.apply(index, &c).unwrap();
            // Entries that remember nothing, and duplicates, must not stop forgetting.
            if i % 3 == 0 {
                index += 1;
                sm.apply(index, &read(i)).unwrap();
                index += 1;
                sm.apply(index, &c).unwrap();
                index += 1;
                sm.skip(index).unwrap();
            }
        }
        let remembered = sm.remembered() as u64;
        assert!(
            remembered <= DEDUP_WINDOW + 1,
            "{remembered} requests remembered"
        );
    }

    #[test]
    fn a_copy_older_than_the_dedup_window_never_applies() {
        let (_d, sm) = sm();
        let r = "refs/heads/main";
        let mut late = cas("g", r, "", A);
        late.proposed_after = 5;
        // Its first copy applied long ago and was forgotten; the group moved on.
        let index = 5 + DEDUP_WINDOW + 1;
        assert!(matches!(
            sm.apply(index, &late).unwrap(),
            Outcome::Refused(_)
        ));
        assert_eq!(sm.ref_value("g", r), None);
        // Within the window it applies.
        let mut fresh = cas("g", r, "", A);
        fresh.proposed_after = index;
        assert_eq!(sm.apply(index + 1, &fresh).unwrap(), one(true, Some(A)));
    }

    #[test]
    fn a_command_that_is_not_valid_is_refused_when_applied_and_changes_nothing() {
        let (_d, sm) = sm();
        let mut outside = register_cmd(1, "g", 2);
        if let Some(Op::Register(r)) = &mut outside.op {
            r.path = "/srv/../etc".into();
        }
        let mut bad_group = register_cmd(2, "g", 2);
        if let Some(Op::Register(r)) = &mut bad_group.op {
            r.group = "../x".into();
        }
        let bad_ref = cas("g", "refs/heads/a..b", "", A);
        let bad_id = cas("g", "refs/heads/main", "", "A-not-an-id");
        for (i, cmd) in [outside, bad_group, bad_ref, bad_id].iter().enumerate() {
            let index = i as u64 + 1;
            assert!(
                matches!(sm.apply(index, cmd).unwrap(), Outcome::Refused(_)),
                "{cmd:?}"
            );
            assert_eq!(sm.applied(), index);
        }
        assert!(sm.groups().is_empty());
        assert_eq!(sm.counts(), (0, 0));
    }

    fn register_cmd(index: u64, group: &str, node_id: u64) -> pb::Command {
        pb::Command {
            origin_node: node_id,
            request_id: 1000 + index,
            op: Some(Op::Register(pb::RegisterOp {
                group: group.into(),
                node_id,
                path: format!("/srv/{group}.git"),
            })),
            proposed_after: index - 1,
        }
    }

    fn change(kind: pb::MemberChangeKind, node_id: u64, addr: &str) -> pb::MemberChange {
        pb::MemberChange {
            kind: kind as i32,
            node_id,
            addr: addr.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_removed_member_keeps_a_tombstone_loses_its_replicas_and_cannot_register() {
        let (_d, sm) = sm();
        let founders: Vec<pb::ClusterMember> = (1..=3)
            .map(|id| pb::ClusterMember {
                id,
                addr: format!("10.0.0.{id}:7420"),
                removed: false,
                claim: id,
            })
            .collect();
        sm.seed_members(1, &founders).unwrap();
        for (i, id) in (1..=3).enumerate() {
            sm.apply(2 + i as u64, &register_cmd(2 + i as u64, "g", id))
                .unwrap();
        }
        sm.apply_member_change(
            5,
            &change(pb::MemberChangeKind::AddLearner, 4, "10.0.0.4:7420"),
        )
        .unwrap();
        sm.apply_member_change(6, &change(pb::MemberChangeKind::Remove, 3, ""))
            .unwrap();
        assert_eq!(sm.applied(), 6);
        let members = sm.members().unwrap();
        assert_eq!(members.len(), 4);
        assert!(
            members[&3].removed,
            "a tombstone, so the id is never reused"
        );
        assert_eq!(members[&3].addr, "10.0.0.3:7420");
        assert_eq!(members[&4].addr, "10.0.0.4:7420");
        let replicas: Vec<u64> = sm.group("g").unwrap().replicas.keys().copied().collect();
        assert_eq!(
            replicas,
            vec![1, 2],
            "nothing may fetch from a removed node"
        );
        let out = sm.apply(7, &register_cmd(7, "g", 3)).unwrap();
        assert!(
            matches!(&out, Outcome::Refused(why) if why.contains("removed")),
            "{out:?}"
        );
        assert_eq!(sm.group("g").unwrap().replicas.len(), 2);

        // Members travel with the snapshot.
        let (idx, data) = sm.snapshot().unwrap();
        let (_d2, other) = self::sm();
        other.restore(idx, &data, b"meta").unwrap();
        assert_eq!(other.members().unwrap(), members);
    }

    #[test]
    fn snapshot_round_trip_and_clobber() {
        let (_d, sm) = sm();
        sm.apply(1, &cas("g", "refs/heads/a", "", A)).unwrap();
        sm.apply(2, &cas("h", "refs/tags/t", "", B)).unwrap();
        let reg = pb::Command {
            origin_node: 2,
            request_id: 9,
            op: Some(Op::Register(pb::RegisterOp {
                group: "g".into(),
                node_id: 2,
                path: "/srv/g.git".into(),
            })),
            proposed_after: 0,
        };
        sm.apply(3, &reg).unwrap();
        let (idx, data) = sm.snapshot().unwrap();
        assert_eq!(idx, 3);

        let (_d2, other) = self::sm();
        other.apply(1, &cas("zzz", "refs/heads/x", "", A)).unwrap();
        other.restore(idx, &data, b"meta").unwrap();
        assert_eq!(
            other.restored_from().unwrap().as_deref(),
            Some(&b"meta"[..])
        );
        assert_eq!(other.groups(), vec!["g".to_string(), "h".to_string()]);
        assert_eq!(other.group("g").unwrap(), sm.group("g").unwrap());
        assert_eq!(other.applied(), 3);

        let clobber = pb::Command {
            origin_node: 1,
            request_id: 2,
            op: Some(Op::Clobber(pb::ClobberOp {
                group: "g".into(),
                refs: vec![pb::ConsensusRef {
                    ref_name: "refs/heads/b".into(),
                    value: B.into(),
                    proposer: 0,
                }],
                proposer: 3,
                // The version survived the snapshot.
                expected_version: sm.group("g").unwrap().version,
            })),
            proposed_after: 0,
        };
        assert_eq!(other.apply(4, &clobber).unwrap(), Outcome::Done);
        let g = other.group("g").unwrap();
        assert_eq!(g.refs.keys().collect::<Vec<_>>(), vec!["refs/heads/b"]);
        assert_eq!(
            g.refs["refs/heads/b"],
            RefValue {
                value: B.into(),
                proposer: 3
            }
        );
        assert_eq!(g.replicas[&2], "/srv/g.git");
        assert_eq!(
            other.hosted_by(2).into_iter().collect::<Vec<_>>(),
            vec![("g".into(), "/srv/g.git".into())]
        );
        assert!(other.hosted_by(1).is_empty());
    }
}
