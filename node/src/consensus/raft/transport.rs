//! Carries raft messages to peers: one sender task per peer, each batching
//! whatever is queued into one `Peer.Raft` call.
//!
//! Every call has a short deadline and the connection has HTTP/2 keepalive,
//! so a peer whose packets vanish is detected in seconds, not at TCP's pace.
//! When a call fails its batch is gone, and so is whatever queued up behind
//! it: raft retransmits from its own state (heartbeats, probes), and stale
//! appends would only delay the fresh ones. Proposals of ours in a lost batch
//! are flagged so their proposers offer them again.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use piehole_protocol::pb;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::members::MemberBook;
use super::proposals::Proposals;
use super::DriverMsg;
use crate::access::REFUSALS;
use crate::peer_client::{self, PeerAuth};

/// In the refusal a member sends to a node the cluster removed.
pub const REMOVED_MARK: &str = "was removed from the cluster";

/// A peer counts as reachable if a call to it succeeded this recently.
const REACHABLE_FOR: Duration = Duration::from_secs(3);
/// An idle sender pings so reachability stays current on followers too.
const PING_EVERY: Duration = Duration::from_millis(500);
/// A batch of appends and heartbeats is answered in milliseconds on a
/// healthy link; past this (plus time for its size) the peer is treated as
/// unreachable, and the connection as dead.
const CALL_DEADLINE: Duration = Duration::from_secs(1);
/// Large batches and snapshots get extra time for their size, at this
/// pessimistic rate.
const BYTES_PER_SEC: u64 = 4 * 1024 * 1024;
const MAX_BATCH: usize = 512;
/// Keeps one call well under the peer API's message limit.
const MAX_BATCH_BYTES: u64 = 32 * 1024 * 1024;

#[derive(Default)]
pub struct PeerHealth {
    last_ok: Mutex<HashMap<u64, Instant>>,
}

impl PeerHealth {
    /// A failed call makes the peer unreachable at once, so a node that
    /// lost its majority stops proposing as soon as it can tell.
    fn mark_failed(&self, peer: u64) {
        self.last_ok
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer);
    }

    fn mark(&self, peer: u64) {
        self.last_ok
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, Instant::now());
    }

    pub fn reachable(&self, peer: u64) -> bool {
        let map = self.last_ok.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&peer).is_some_and(|t| t.elapsed() < REACHABLE_FOR)
    }
}

/// Starts a sender per member; returns the function the driver hands
/// outgoing messages to. Members added or removed later get (or lose) a
/// sender as soon as the book changes.
pub fn start(
    self_id: u64,
    members: Arc<MemberBook>,
    auth: PeerAuth,
    health: Arc<PeerHealth>,
    proposals: Arc<Proposals>,
    inbox: mpsc::Sender<DriverMsg>,
) -> Box<dyn Fn(Vec<Message>) + Send> {
    let senders = Mutex::new(Senders {
        self_id,
        members,
        auth,
        health,
        proposals,
        inbox,
        queues: HashMap::new(),
        synced_at: None,
        runtime: tokio::runtime::Handle::current(),
    });
    senders.lock().unwrap_or_else(|e| e.into_inner()).sync();
    Box::new(move |msgs: Vec<Message>| {
        let mut senders = senders.lock().unwrap_or_else(|e| e.into_inner());
        senders.sync();
        for m in msgs {
            if let Some((_, q)) = senders.queues.get(&m.to) {
                let _ = q.send(m);
            }
        }
    })
}

struct Senders {
    self_id: u64,
    members: Arc<MemberBook>,
    auth: PeerAuth,
    health: Arc<PeerHealth>,
    proposals: Arc<Proposals>,
    inbox: mpsc::Sender<DriverMsg>,
    /// member id -> (address its sender dials, queue)
    queues: HashMap<u64, (String, UnboundedSender<Message>)>,
    synced_at: Option<u64>,
    /// The driver calls from its own thread, outside the runtime.
    runtime: tokio::runtime::Handle,
}

impl Senders {
    /// One sender per current member other than us, each dialing the
    /// member's current address; a dropped queue ends its sender.
    fn sync(&mut self) {
        let generation = self.members.generation();
        if self.synced_at == Some(generation) {
            return;
        }
        self.synced_at = Some(generation);
        let mut current = self.members.current();
        current.remove(&self.self_id);
        self.queues
            .retain(|id, (addr, _)| current.get(id).is_some_and(|a| a == addr));
        for (id, addr) in current {
            if self.queues.contains_key(&id) {
                continue;
            }
            let (tx, rx) = unbounded_channel();
            self.queues.insert(id, (addr.clone(), tx));
            let sender = PeerSender {
                from: self.self_id,
                from_addr: self.members.recorded_addr(self.self_id),
                to: id,
                addr,
                auth: self.auth.clone(),
                inbox: self.inbox.clone(),
                health: self.health.clone(),
                proposals: self.proposals.clone(),
            };
            self.runtime.spawn(sender.run(rx));
        }
    }
}

struct PeerSender {
    from: u64,
    from_addr: String,
    to: u64,
    addr: String,
    auth: PeerAuth,
    inbox: mpsc::Sender<DriverMsg>,
    health: Arc<PeerHealth>,
    proposals: Arc<Proposals>,
}

impl PeerSender {
    async fn run(self, mut rx: UnboundedReceiver<Message>) {
        let mut client = match peer_client::connect(Some(self.to), &self.addr, &self.auth) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(peer = self.to, addr = %self.addr, error = %e, "bad peer address");
                return;
            }
        };
        loop {
            let mut batch = Vec::new();
            match tokio::time::timeout(PING_EVERY, rx.recv()).await {
                Ok(Some(m)) => batch.push(m),
                Ok(None) => return,
                Err(_) => {} // idle: send an empty batch as a ping
            }
            let mut bytes: u64 = batch.iter().map(|m| u64::from(m.compute_size())).sum();
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(m) => {
                        bytes += u64::from(m.compute_size());
                        batch.push(m);
                    }
                    Err(_) => break,
                }
            }
            let has_snapshot = batch
                .iter()
                .any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
            let deadline = CALL_DEADLINE + Duration::from_millis(bytes * 1000 / BYTES_PER_SEC);
            let req = pb::RaftBatch {
                from: self.from,
                from_addr: self.from_addr.clone(),
                messages: batch
                    .iter()
                    .filter_map(|m| m.write_to_bytes().ok())
                    .collect(),
            };
            let result = match tokio::time::timeout(deadline, client.raft(req)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(status)) => {
                    if status.code() == tonic::Code::PermissionDenied
                        && status.message().contains(REMOVED_MARK)
                    {
                        // The cluster removed us while we were away.
                        let _ = self
                            .inbox
                            .send(DriverMsg::Removed(status.message().to_string()));
                    }
                    let why = peer_client::refusal(&status);
                    if status.code() == tonic::Code::Unauthenticated
                        && REFUSALS.allow(&format!("our secret at {}", self.to))
                    {
                        tracing::warn!(peer = self.to, "raft messages refused: {why}");
                    }
                    Err(why)
                }
                Err(_) => Err(format!("no answer within {deadline:?}")),
            };
            match result {
                Ok(()) => {
                    self.health.mark(self.to);
                    if has_snapshot {
                        self.report_snapshot(true);
                    }
                }
                Err(why) => {
                    self.health.mark_failed(self.to);
                    tracing::debug!(peer = self.to, error = %why, "raft send failed");
                    // The connection may be the one that died (packets lost
                    // on a path that has since healed): dial a new one rather
                    // than wait for keepalive to give up on it.
                    if let Ok(fresh) = peer_client::connect(Some(self.to), &self.addr, &self.auth) {
                        client = fresh;
                    }
                    // Stale by the time the peer is back; raft resends what matters.
                    while let Ok(m) = rx.try_recv() {
                        batch.push(m);
                    }
                    self.flag_lost_proposals(&batch);
                    if !batch.is_empty() {
                        let _ = self.inbox.send(DriverMsg::Unreachable(self.to));
                    }
                    if batch
                        .iter()
                        .any(|m| m.get_msg_type() == MessageType::MsgSnapshot)
                    {
                        self.report_snapshot(false);
                    }
                }
            }
        }
    }

    fn report_snapshot(&self, ok: bool) {
        let _ = self.inbox.send(DriverMsg::SnapshotSent { to: self.to, ok });
    }

    /// Our proposals forwarded to the leader in a batch that did not arrive.
    fn flag_lost_proposals(&self, batch: &[Message]) {
        use prost::Message as _;
        for m in batch {
            if m.get_msg_type() != MessageType::MsgPropose {
                continue;
            }
            for e in m.get_entries() {
                if let Ok(cmd) = pb::Command::decode(&e.data[..]) {
                    if cmd.origin_node == self.from {
                        self.proposals.mark_lost(cmd.request_id);
                    }
                }
            }
        }
    }
}
