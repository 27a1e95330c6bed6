//! The embedded Raft backend: a `raft::RawNode` owned by one driver thread,
//! its log in sled, its messages carried by the peer API.
//!
//! Callers (any task) turn a request into a `Command`, hand it to the driver
//! and wait for the node itself to apply it: the origin node resolves its own
//! waiter when the entry comes out of its log, so a proposal made at a
//! follower (raft forwards it to the leader) still returns its own result.
//!
//! A proposal is offered again only when it may have been lost: the driver
//! or the transport saw it dropped, or the leader changed (a leader that lost
//! its term may have discarded it). The state machine answers a second copy
//! without applying it.

pub mod bootstrap;
mod driver;
mod logger;
mod members;
mod proposals;
pub mod storage;
mod transport;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use piehole_protocol::pb::{self, command::Op};
use prost::Message as _;
use tokio::sync::broadcast;

use super::{
    ClusterStatus, Consensus, ConsensusError, GroupView, MemberChange, RefOutcome, RefUpdate,
};
use crate::config::NodeConfig;
use crate::peer_client::{self, PeerAuth};
use crate::state::{Outcome, StateMachine};

pub use driver::DriverMsg;
pub use members::MemberBook;
use proposals::Proposals;
pub use transport::{PeerHealth, REMOVED_MARK};

/// After this long without a reachable majority a proposal fails with
/// "no quorum" rather than waiting out the whole bound.
const NO_QUORUM_AFTER: Duration = Duration::from_secs(3);
/// How often a waiting proposal looks at the cluster's health.
const POLL: Duration = Duration::from_millis(20);
/// How a forwarded membership change that never left begins.
const NOT_CONNECTED: &str = "could not connect to the leader";
/// A proposal needs at least this long to be seen committing.
const MIN_TIME_TO_PROPOSE: Duration = Duration::from_millis(100);

/// What the driver publishes after each turn of its loop.
#[derive(Debug, Clone, Default)]
pub struct RaftProgress {
    pub leader_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub first_log_index: u64,
    pub snapshot_index: u64,
    pub snapshots_installed: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// The leader's last log index; with `matched`, only on the leader.
    pub last_index: u64,
    pub matched: BTreeMap<u64, u64>,
}

pub struct Started {
    pub consensus: Arc<RaftConsensus>,
    /// Where the peer API delivers incoming raft messages.
    pub inbox: mpsc::Sender<DriverMsg>,
    /// The driver thread; it ends only on a fatal storage error or shutdown.
    pub driver: std::thread::JoinHandle<anyhow::Result<()>>,
}

pub struct RaftConsensus {
    id: u64,
    cluster_id: u64,
    members: Arc<MemberBook>,
    auth: PeerAuth,
    inbox: mpsc::Sender<DriverMsg>,
    proposals: Arc<Proposals>,
    state: Arc<StateMachine>,
    progress: Arc<Mutex<RaftProgress>>,
    health: Arc<PeerHealth>,
    next_request: AtomicU64,
    request_timeout: Duration,
    /// The commit index stored when the node started: the state must reach
    /// it before local refs may follow the state (see `wait_replayed`).
    committed_at_start: u64,
}

impl RaftConsensus {
    /// Starts the driver thread and the peer senders on a data dir that
    /// belongs to cluster `cluster_id` (see [`bootstrap::establish`]).
    pub fn start(
        config: &NodeConfig,
        storage: storage::RaftStorage,
        state: Arc<StateMachine>,
        auth: PeerAuth,
        cluster_id: u64,
    ) -> anyhow::Result<Started> {
        let (inbox_tx, inbox_rx) = mpsc::channel();
        let health = Arc::new(PeerHealth::default());
        let proposals: Arc<Proposals> = Arc::default();
        let members = Arc::new(MemberBook::new(config, &state)?);
        let outbox = transport::start(
            config.id,
            members.clone(),
            auth.clone(),
            health.clone(),
            proposals.clone(),
            inbox_tx.clone(),
        );
        let progress: Arc<Mutex<RaftProgress>> = Arc::default();
        let driver = driver::Driver::new(
            config,
            storage,
            driver::Shared {
                state: state.clone(),
                members: members.clone(),
                health: health.clone(),
                proposals: proposals.clone(),
                progress: progress.clone(),
            },
            inbox_rx,
            outbox,
        )?;
        let committed_at_start = driver.committed_at_start();
        let handle = std::thread::Builder::new()
            .name("raft-driver".into())
            .spawn(move || driver.run())?;
        let consensus = Arc::new(RaftConsensus {
            id: config.id,
            cluster_id,
            members,
            auth,
            inbox: inbox_tx.clone(),
            proposals,
            state,
            progress,
            health,
            next_request: AtomicU64::new(rand::random::<u64>() >> 1),
            request_timeout: config.request_timeout,
            committed_at_start,
        });
        Ok(Started {
            consensus,
            inbox: inbox_tx,
            driver: handle,
        })
    }

    /// A membership change carried out here, on the leader: the driver
    /// checks it against the configuration and proposes it.
    async fn change_on_leader(&self, change: pb::MemberChange) -> Result<(), ConsensusError> {
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let change = pb::MemberChange {
            origin_node: self.id,
            request_id,
            ..change
        };
        let waiting = self.proposals.register(request_id);
        let _forget = Forget(&self.proposals, request_id);
        if self.inbox.send(DriverMsg::ChangeMember(change)).is_err() {
            return Err(ConsensusError::ShuttingDown);
        }
        match tokio::time::timeout(self.request_timeout, waiting.outcome).await {
            Ok(Ok(outcome)) => done(outcome),
            Ok(Err(_)) => Err(ConsensusError::ShuttingDown),
            Err(_) => Err(ConsensusError::TimedOut),
        }
    }

    fn quorum_reachable(&self) -> bool {
        let voters = self.progress().voters;
        let reachable = voters
            .iter()
            .filter(|&&p| p == self.id || self.health.reachable(p))
            .count();
        reachable * 2 > voters.len()
    }

    /// Proposes `op` and waits until this node has applied it.
    ///
    /// Nothing is proposed while no majority is reachable, so `NoQuorum`
    /// means nothing changed. Once proposed, an entry cannot be withdrawn:
    /// if the majority goes away afterwards the answer is `LostQuorum` (or
    /// `TimedOut`), which say the outcome is unknown.
    async fn propose(&self, op: Op) -> Result<Outcome, ConsensusError> {
        self.propose_by(op, Instant::now() + self.request_timeout)
            .await
    }

    /// [`RaftConsensus::propose`], failing by `deadline` at the latest.
    async fn propose_by(&self, op: Op, deadline: Instant) -> Result<Outcome, ConsensusError> {
        let start = Instant::now();
        let deadline = deadline.min(start + self.request_timeout);
        let bound = deadline.saturating_duration_since(start);
        // Too little time to see it commit: proposing would only turn a
        // clean refusal into an "it may still take effect".
        if bound < MIN_TIME_TO_PROPOSE {
            return Err(ConsensusError::OutOfTime);
        }
        let patience = NO_QUORUM_AFTER.min(bound);
        while !self.can_propose() {
            if start.elapsed() >= patience {
                return Err(ConsensusError::NoQuorum);
            }
            tokio::time::sleep(POLL).await;
        }
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let data = pb::Command {
            origin_node: self.id,
            request_id,
            op: Some(op),
            proposed_after: self.state.applied(),
        }
        .encode_to_vec();
        let mut waiting = self.proposals.register(request_id);
        // Forgotten however this ends, a caller that gave up included.
        let _forget = Forget(&self.proposals, request_id);
        // The leader (and its term) the proposal was last offered to. A
        // leader that lost its term may have dropped or overwritten it, and
        // a node that restarts and wins again is the same id in a new term.
        let mut offered_to: Option<(u64, u64)> = None;
        let mut lost_since: Option<Instant> = None;
        let result = loop {
            let progress = self.progress();
            let leader = (progress.leader_id, progress.term);
            let offer = match offered_to {
                None => true,
                Some(was) => {
                    waiting.lost.load(Ordering::Relaxed) || (leader.0 != 0 && leader != was)
                }
            };
            if offer && leader.0 != 0 {
                waiting.lost.store(false, Ordering::Relaxed);
                let msg = DriverMsg::Propose {
                    request_id,
                    data: data.clone(),
                };
                if self.inbox.send(msg).is_err() {
                    break Err(ConsensusError::ShuttingDown);
                }
                offered_to = Some(leader);
            }
            match tokio::time::timeout(POLL, &mut waiting.outcome).await {
                Ok(Ok(outcome)) => break Ok(outcome),
                Ok(Err(_)) => break Err(ConsensusError::ShuttingDown),
                Err(_) => {}
            }
            lost_since = if self.can_propose() {
                None
            } else {
                lost_since.or(Some(Instant::now()))
            };
            if lost_since.is_some_and(|t| t.elapsed() >= patience) {
                break Err(ConsensusError::LostQuorum);
            }
            if Instant::now() >= deadline {
                break Err(if lost_since.is_some() {
                    ConsensusError::LostQuorum
                } else {
                    ConsensusError::TimedOut
                });
            }
        };
        result
    }

    /// A majority answers and some node leads.
    fn can_propose(&self) -> bool {
        self.quorum_reachable() && self.progress().leader_id != 0
    }

    fn progress(&self) -> RaftProgress {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl RaftConsensus {
    fn removed_self(&self) -> bool {
        self.members.is_removed(self.id)
    }

    /// A follower hands a membership change to the leader, which alone
    /// knows whether another change is still in flight.
    async fn forward_change(
        &self,
        leader: u64,
        change: pb::MemberChange,
    ) -> Result<(), ConsensusError> {
        let Some(addr) = self.members.addr(leader) else {
            return Err(ConsensusError::NoQuorum);
        };
        let mut client = peer_client::connect(Some(leader), &addr, &self.auth).map_err(|e| {
            ConsensusError::Unavailable(format!("{NOT_CONNECTED} (node {leader}): {e}"))
        })?;
        let req = pb::MemberChangeRequest {
            kind: change.kind,
            node_id: change.node_id,
            addr: change.addr,
            nonce: 0,
        };
        // The leader's own bound, and a margin for the hop.
        let bound = self.request_timeout + Duration::from_secs(1);
        match tokio::time::timeout(bound, client.change_member(req)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                Err(ConsensusError::Refused(status.message().to_string()))
            }
            // The connection was never made: the request did not leave.
            Ok(Err(status))
                if status.code() == tonic::Code::Unavailable
                    && status.message().contains("connect error") =>
            {
                Err(ConsensusError::Unavailable(format!(
                    "{NOT_CONNECTED} (node {leader}): {}",
                    status.message()
                )))
            }
            // The leader's own verdict: it proposed nothing.
            Ok(Err(status))
                if status.code() == tonic::Code::Unavailable
                    && status.message().contains("nothing was changed") =>
            {
                Err(ConsensusError::Refused(status.message().to_string()))
            }
            Ok(Err(status)) => Err(ConsensusError::Uncertain(format!(
                "the leader (node {leader}) answered: {}",
                status.message()
            ))),
            Err(_) => Err(ConsensusError::TimedOut),
        }
    }
}

/// Forgets a proposal's waiter when dropped.
struct Forget<'a>(&'a Proposals, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget(self.1);
    }
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_default()
}

fn done(outcome: Outcome) -> Result<(), ConsensusError> {
    match outcome {
        Outcome::Refused(why) => Err(ConsensusError::Refused(why)),
        _ => Ok(()),
    }
}

#[async_trait]
impl Consensus for RaftConsensus {
    fn node_id(&self) -> u64 {
        self.id
    }

    fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    async fn update_refs(
        &self,
        group: &str,
        updates: Vec<RefUpdate>,
        atomic: bool,
        deadline: Instant,
    ) -> Result<Vec<RefOutcome>, ConsensusError> {
        let count = updates.len();
        let op = Op::Push(pb::PushOp {
            group: group.into(),
            updates: updates
                .iter()
                .map(|u| pb::RefCas {
                    ref_name: u.ref_name.clone(),
                    expected: opt(&u.expected),
                    new: opt(&u.new),
                })
                .collect(),
            atomic,
            proposer: self.id,
        });
        match self.propose_by(op, deadline).await? {
            Outcome::Push(out) if out.len() == count => Ok(out),
            Outcome::Refused(why) => Err(ConsensusError::Refused(why)),
            other => Err(ConsensusError::Refused(format!(
                "unexpected outcome for a push: {other:?}"
            ))),
        }
    }

    async fn clobber(
        &self,
        group: &str,
        refs: BTreeMap<String, String>,
        expected_version: u64,
    ) -> Result<(), ConsensusError> {
        let refs = refs
            .into_iter()
            .map(|(ref_name, value)| pb::ConsensusRef {
                ref_name,
                value,
                proposer: self.id,
            })
            .collect();
        done(
            self.propose(Op::Clobber(pb::ClobberOp {
                group: group.into(),
                refs,
                proposer: self.id,
                expected_version,
            }))
            .await?,
        )
    }

    async fn register(&self, group: &str, node_id: u64, path: &str) -> Result<(), ConsensusError> {
        let op = Op::Register(pb::RegisterOp {
            group: group.into(),
            node_id,
            path: path.into(),
        });
        done(self.propose(op).await?)
    }

    async fn group(&self, group: &str, linearizable: bool) -> Result<GroupView, ConsensusError> {
        if linearizable {
            // A read changes nothing, whatever became of it: no "may still
            // take effect" for a read that lost its majority.
            let read = match self.propose(Op::Read(pb::ReadOp {})).await {
                Err(ConsensusError::LostQuorum) => Err(ConsensusError::NoQuorum),
                other => other,
            };
            done(read?)?;
        }
        self.local_group(group)
    }

    fn local_group(&self, group: &str) -> Result<GroupView, ConsensusError> {
        self.state
            .group(group)
            .map_err(|e| ConsensusError::Refused(format!("reading state: {e}")))
    }

    fn peers(&self) -> BTreeMap<u64, String> {
        self.members.current()
    }

    async fn change_member(&self, change: MemberChange) -> Result<(), ConsensusError> {
        let change = match change {
            MemberChange::Add { id, addr } => pb::MemberChange {
                kind: pb::MemberChangeKind::AddLearner as i32,
                node_id: id,
                addr,
                ..Default::default()
            },
            MemberChange::Remove { id } => pb::MemberChange {
                kind: pb::MemberChangeKind::Remove as i32,
                node_id: id,
                ..Default::default()
            },
            // A normal command: any member can propose it.
            MemberChange::Claim { id, nonce } => {
                return done(
                    self.propose(Op::Claim(pb::ClaimOp { node_id: id, nonce }))
                        .await?,
                );
            }
        };
        // Right after a leader was removed the others may still name it for
        // a moment: wait for a leader that is a member, within the bound.
        let start = Instant::now();
        loop {
            let leader = self.progress().leader_id;
            if leader == self.id && self.removed_self() {
                return Err(ConsensusError::Refused(
                    "this node was removed from the cluster; ask another member".into(),
                ));
            }
            if leader == self.id {
                match self.change_on_leader(change.clone()).await {
                    // It handed over: the next leader carries it out.
                    Err(ConsensusError::Refused(why)) if why == driver::HANDING_OVER => {
                        if start.elapsed() >= self.request_timeout {
                            return Err(ConsensusError::Unavailable(format!(
                                "the leader (this node, the one to remove) could not hand over \
                                 leadership within {:?}",
                                self.request_timeout
                            )));
                        }
                        tokio::time::sleep(POLL * 5).await;
                        continue;
                    }
                    other => return other,
                }
            }
            if leader != 0 && self.members.addr(leader).is_some() {
                match self.forward_change(leader, change.clone()).await {
                    // Nothing was sent: the leader we knew of is gone, and
                    // another may be elected within the bound.
                    Err(ConsensusError::Unavailable(why))
                        if why.starts_with(NOT_CONNECTED)
                            && start.elapsed() < NO_QUORUM_AFTER.max(self.request_timeout / 2) =>
                    {
                        tokio::time::sleep(POLL * 5).await;
                        continue;
                    }
                    other => return other,
                }
            }
            if start.elapsed() >= NO_QUORUM_AFTER.max(self.request_timeout / 2) {
                return Err(ConsensusError::NoQuorum);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn voter_count(&self) -> usize {
        self.progress().voters.len()
    }

    fn was_removed(&self, id: u64) -> bool {
        self.members.is_removed(id)
    }

    fn learn_peer(&self, id: u64, addr: &str) {
        self.members.learn(id, addr);
    }

    fn cluster_id(&self) -> Option<u64> {
        Some(self.cluster_id)
    }

    fn groups(&self) -> Vec<String> {
        self.state.groups()
    }

    fn local_value(&self, group: &str, ref_name: &str) -> Option<String> {
        self.state.ref_value(group, ref_name)
    }

    fn hosted(&self) -> BTreeMap<String, String> {
        self.state.hosted_by(self.id)
    }

    fn subscribe(&self) -> broadcast::Receiver<String> {
        self.state.subscribe()
    }

    async fn wait_replayed(&self) {
        while self.state.applied() < self.committed_at_start {
            tokio::time::sleep(POLL).await;
        }
    }

    fn counts(&self) -> (u64, u64) {
        self.state.counts()
    }

    fn status(&self) -> ClusterStatus {
        let p = self.progress();
        ClusterStatus {
            node_id: self.id,
            backend: "raft",
            leader_id: p.leader_id,
            term: p.term,
            commit_index: p.commit_index,
            applied_index: p.applied_index,
            first_log_index: p.first_log_index,
            snapshot_index: p.snapshot_index,
            snapshots_installed: p.snapshots_installed,
            members: self
                .members
                .all()
                .into_iter()
                .map(|(id, addr, removed)| {
                    let role = if removed {
                        "removed"
                    } else if p.voters.contains(&id) {
                        "voter"
                    } else {
                        "learner"
                    };
                    super::MemberStatus {
                        id,
                        addr,
                        reachable: !removed && (id == self.id || self.health.reachable(id)),
                        role,
                        progress: p
                            .matched
                            .get(&id)
                            .map(|&m| (m, p.last_index.saturating_sub(m))),
                    }
                })
                .collect(),
            store: String::new(),
            cluster_id: self.cluster_id,
        }
    }
}
