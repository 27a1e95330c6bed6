//! The one seam between piehole and whatever agrees on refs.
//!
//! The update rule, the replicator and the APIs talk to [`Consensus`] only;
//! they never see Raft types, so the etcd backend can sit behind the same
//! trait. Every write returns after it is committed and applied on the node
//! answering (linearizable); `group(.., linearizable: false)` answers from
//! local state, which is what a minority partition can still serve.

pub mod etcd;
pub mod raft;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use thiserror::Error;
use tokio::sync::broadcast;

pub use crate::state::{GroupView, RefOutcome, RefValue};

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConsensusError {
    /// Nothing was proposed: this node cannot reach a majority.
    #[error(
        "no quorum: fewer than a majority of piehole nodes are reachable; nothing was changed"
    )]
    NoQuorum,
    /// Proposed, then the majority was lost before it committed.
    #[error(
        "no quorum: the cluster lost its majority while this update was pending; \
         it may still take effect when the majority returns"
    )]
    LostQuorum,
    /// Proposed, not committed within the bound, majority apparently there.
    #[error(
        "timed out waiting for the piehole cluster to commit; the update may still take effect"
    )]
    TimedOut,
    /// Nothing was proposed: the caller's deadline left no time for it.
    #[error("no time was left to decide this before its deadline; nothing was changed")]
    OutOfTime,
    /// The backend's store could not be reached, or refused for want of a
    /// leader, before anything was written. The text names the store.
    #[error("{0}; nothing was changed")]
    Unavailable(String),
    /// Sent to the backend's store, no answer: it may have been written.
    #[error("{0}; the update may still take effect")]
    Uncertain(String),
    #[error("{0}")]
    Refused(String),
    #[error("the piehole node is shutting down")]
    ShuttingDown,
}

/// One ref's compare-and-swap within a push. `None` is "absent".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefUpdate {
    pub ref_name: String,
    pub expected: Option<String>,
    pub new: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct MemberStatus {
    pub id: u64,
    pub addr: String,
    pub reachable: bool,
    /// "voter", "learner" or "removed" (embedded Raft); empty in etcd mode.
    pub role: &'static str,
    /// (matched index, entries behind the leader's last), as the leader
    /// sees them; None on a node that does not lead.
    pub progress: Option<(u64, u64)>,
}

/// A change of the embedded Raft's members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    /// A new member, as a learner; the leader promotes it once caught up.
    Add {
        id: u64,
        addr: String,
    },
    Remove {
        id: u64,
    },
    /// A node started with --join claims its id for the data dir with this
    /// nonce, before it starts raft (see `ClaimOp`).
    Claim {
        id: u64,
        nonce: u64,
    },
}

#[derive(Debug, Clone, Default)]
pub struct ClusterStatus {
    pub node_id: u64,
    pub backend: &'static str,
    /// 0 when no leader is known.
    pub leader_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub first_log_index: u64,
    pub snapshot_index: u64,
    pub snapshots_installed: u64,
    pub members: Vec<MemberStatus>,
    /// etcd mode: the store, this node's revision, or why it is unreachable.
    pub store: String,
    /// Embedded Raft: the cluster's id; 0 in etcd mode.
    pub cluster_id: u64,
}

#[async_trait]
pub trait Consensus: Send + Sync + 'static {
    fn node_id(&self) -> u64;

    /// How long a write may wait for the cluster before failing.
    fn request_timeout(&self) -> Duration;

    /// Compare-and-swap of several refs of one group, decided in one step:
    /// per ref, or all or nothing when `atomic`. One outcome per update, in
    /// order. Fails by `deadline` at the latest (or the request timeout,
    /// whichever comes first).
    async fn update_refs(
        &self,
        group: &str,
        updates: Vec<RefUpdate>,
        atomic: bool,
        deadline: Instant,
    ) -> Result<Vec<RefOutcome>, ConsensusError>;

    /// One ref's compare-and-swap.
    async fn cas(
        &self,
        group: &str,
        ref_name: &str,
        expected: Option<&str>,
        new: Option<&str>,
    ) -> Result<RefOutcome, ConsensusError> {
        let update = RefUpdate {
            ref_name: ref_name.to_string(),
            expected: expected.map(String::from),
            new: new.map(String::from),
        };
        let deadline = Instant::now() + self.request_timeout();
        let mut out = self
            .update_refs(group, vec![update], false, deadline)
            .await?;
        out.pop()
            .ok_or_else(|| ConsensusError::Refused("no outcome for the update".into()))
    }

    /// Replaces every consensus ref of `group` with `refs` (name -> id), if
    /// the group is still at `expected_version` (nothing landed since the
    /// caller looked); else `Refused` and nothing changes.
    async fn clobber(
        &self,
        group: &str,
        refs: BTreeMap<String, String>,
        expected_version: u64,
    ) -> Result<(), ConsensusError>;

    /// Records that `node_id` hosts a replica of `group` at `path`.
    async fn register(&self, group: &str, node_id: u64, path: &str) -> Result<(), ConsensusError>;

    async fn group(&self, group: &str, linearizable: bool) -> Result<GroupView, ConsensusError>;

    /// A group as this node's applied state has it now (no round trip);
    /// refs and replicas as of one applied index.
    fn local_group(&self, group: &str) -> Result<GroupView, ConsensusError>;

    /// Every piehole node this one knows of, itself included: id -> peer
    /// API address. The current members (voters and learners) in Raft
    /// mode, registrations in etcd mode.
    fn peers(&self) -> BTreeMap<u64, String>;

    /// How many nodes a majority is counted over: the voters in Raft mode
    /// (a learner catching up does not count), every node in etcd mode.
    fn voter_count(&self) -> usize {
        self.peers().len()
    }

    /// Adds or removes a member; returns once the change is committed and
    /// applied. Only the embedded Raft has members to change.
    async fn change_member(&self, _change: MemberChange) -> Result<(), ConsensusError> {
        Err(ConsensusError::Refused(
            "in etcd mode the nodes are whatever registers under the prefix; \
             there are no members to change"
                .into(),
        ))
    }

    /// A node of our cluster that is not among `peers()` sent raft messages,
    /// introducing itself at `addr`: a member added while this node was
    /// behind. Only the embedded Raft has such members.
    fn learn_peer(&self, _id: u64, _addr: &str) {}

    /// Whether `id` was removed from the cluster (its calls are refused).
    fn was_removed(&self, _id: u64) -> bool {
        false
    }

    /// The cluster id peers must present; None when there is none (etcd).
    fn cluster_id(&self) -> Option<u64> {
        None
    }

    /// Groups known to this node's applied state.
    fn groups(&self) -> Vec<String>;

    /// One consensus ref as applied on this node (no round trip).
    fn local_value(&self, group: &str, ref_name: &str) -> Option<String>;

    /// group -> repository path of every replica this node hosts (local state).
    fn hosted(&self) -> BTreeMap<String, String>;

    /// Names of groups as their state changes on this node.
    fn subscribe(&self) -> broadcast::Receiver<String>;

    /// Returns once this node's state has caught up with everything it knew
    /// to be committed when it started (after a crash, state written but not
    /// flushed is replayed from the log). Until then the local state may be
    /// older than what the replicas were already moved to, so nothing may
    /// move a local ref on its word.
    async fn wait_replayed(&self);

    fn status(&self) -> ClusterStatus;

    /// (groups, consensus refs) in this node's applied state.
    fn counts(&self) -> (u64, u64);
}
