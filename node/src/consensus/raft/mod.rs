//! The embedded Raft backend: a `raft::RawNode` owned by one driver thread,
//! its log in sled, its messages carried by the peer API.
//!
//! Callers (any task) turn a request into a `Command`, hand it to the driver
//! and wait for the node itself to apply it: the origin node resolves its own
//! waiter when the entry comes out of its log, so a proposal made at a
//! follower (raft forwards it to the leader) still returns its own result.

mod driver;
mod logger;
pub mod storage;
mod transport;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use piehole_protocol::pb::{self, command::Op};
use prost::Message as _;
use tokio::sync::{broadcast, oneshot};

use super::{CasResult, ClusterStatus, Consensus, ConsensusError, GroupView};
use crate::config::NodeConfig;
use crate::peer_client::PeerAuth;
use crate::state::{Outcome, StateMachine};

pub use driver::DriverMsg;
pub use transport::PeerHealth;

/// How often a proposal that has not come back is offered again (it may have
/// been dropped by a leader that lost its term).
const RESEND_EVERY: Duration = Duration::from_secs(2);
/// After this long without a reachable majority a proposal fails with
/// "no quorum" rather than waiting out the whole bound.
const NO_QUORUM_AFTER: Duration = Duration::from_secs(3);
/// How often a waiting proposal looks at the cluster's health.
const POLL: Duration = Duration::from_millis(20);

type Waiters = Mutex<HashMap<u64, oneshot::Sender<Outcome>>>;

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
    peers: BTreeMap<u64, String>,
    inbox: mpsc::Sender<DriverMsg>,
    waiters: Arc<Waiters>,
    state: Arc<StateMachine>,
    progress: Arc<Mutex<RaftProgress>>,
    health: Arc<PeerHealth>,
    next_request: AtomicU64,
    request_timeout: Duration,
}

impl RaftConsensus {
    /// Opens the log and state in `db`, starts the driver thread and the peer
    /// senders.
    pub fn start(
        config: &NodeConfig,
        db: sled::Db,
        state: Arc<StateMachine>,
        auth: PeerAuth,
    ) -> anyhow::Result<Started> {
        let (inbox_tx, inbox_rx) = mpsc::channel();
        let health = Arc::new(PeerHealth::default());
        let outbox = transport::start(config, auth, inbox_tx.clone(), health.clone());
        let waiters: Arc<Waiters> = Arc::default();
        let progress: Arc<Mutex<RaftProgress>> = Arc::default();
        let voters: Vec<u64> = config.peers.keys().copied().collect();
        let storage = storage::RaftStorage::open(db, state.clone(), &voters)?;
        let driver = driver::Driver::new(
            config,
            storage,
            state.clone(),
            inbox_rx,
            outbox,
            waiters.clone(),
            progress.clone(),
        )?;
        let handle = std::thread::Builder::new()
            .name("raft-driver".into())
            .spawn(move || driver.run())?;
        let consensus = Arc::new(RaftConsensus {
            id: config.id,
            peers: config.peers.clone(),
            inbox: inbox_tx.clone(),
            waiters,
            state,
            progress,
            health,
            next_request: AtomicU64::new(rand::random::<u64>() >> 1),
            request_timeout: config.request_timeout,
        });
        Ok(Started {
            consensus,
            inbox: inbox_tx,
            driver: handle,
        })
    }

    fn quorum_reachable(&self) -> bool {
        let reachable = 1 + self
            .peers
            .keys()
            .filter(|&&p| p != self.id && self.health.reachable(p))
            .count();
        reachable * 2 > self.peers.len()
    }

    /// Proposes `op` and waits until this node has applied it.
    ///
    /// Nothing is proposed while no majority is reachable, so `NoQuorum`
    /// means nothing changed. Once proposed, an entry cannot be withdrawn:
    /// if the majority goes away afterwards the answer is `LostQuorum` (or
    /// `TimedOut`), which say the outcome is unknown.
    async fn propose(&self, op: Op) -> Result<Outcome, ConsensusError> {
        let start = Instant::now();
        let patience = NO_QUORUM_AFTER.min(self.request_timeout);
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
        }
        .encode_to_vec();
        let (tx, mut rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request_id, tx);
        // (when, leader then): a proposal forwarded to a leader that has since
        // died is lost, so it is offered again at once when the leader changes.
        let mut sent: Option<(Instant, u64)> = None;
        let mut lost_since: Option<Instant> = None;
        let result = loop {
            let leader = self.progress().leader_id;
            let resend = match sent {
                None => true,
                Some((at, was)) => at.elapsed() >= RESEND_EVERY || (leader != 0 && leader != was),
            };
            if resend {
                if self.inbox.send(DriverMsg::Propose(data.clone())).is_err() {
                    break Err(ConsensusError::ShuttingDown);
                }
                sent = Some((Instant::now(), leader));
            }
            match tokio::time::timeout(POLL, &mut rx).await {
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
            if start.elapsed() >= self.request_timeout {
                break Err(if lost_since.is_some() {
                    ConsensusError::LostQuorum
                } else {
                    ConsensusError::TimedOut
                });
            }
        };
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&request_id);
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

fn opt(s: Option<&str>) -> String {
    s.unwrap_or_default().to_string()
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

    async fn cas(
        &self,
        group: &str,
        ref_name: &str,
        expected: Option<&str>,
        new: Option<&str>,
    ) -> Result<CasResult, ConsensusError> {
        let op = Op::Cas(pb::CasOp {
            group: group.into(),
            ref_name: ref_name.into(),
            expected: opt(expected),
            new: opt(new),
            proposer: self.id,
        });
        match self.propose(op).await? {
            Outcome::Cas { applied, current } => Ok(CasResult { applied, current }),
            Outcome::Refused(why) => Err(ConsensusError::Refused(why)),
            Outcome::Done => Err(ConsensusError::Refused(
                "unexpected outcome for a CAS".into(),
            )),
        }
    }

    async fn clobber(
        &self,
        group: &str,
        refs: BTreeMap<String, String>,
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
            done(self.propose(Op::Read(pb::ReadOp {})).await?)?;
        }
        self.state
            .group(group)
            .map_err(|e| ConsensusError::Refused(format!("reading state: {e}")))
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
                .peers
                .iter()
                .map(|(&id, addr)| super::MemberStatus {
                    id,
                    addr: addr.clone(),
                    reachable: id == self.id || self.health.reachable(id),
                })
                .collect(),
        }
    }
}
