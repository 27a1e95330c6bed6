//! Carries raft messages to peers: one sender task per peer, each batching
//! whatever is queued into one `Peer.Raft` call. A failed send is dropped —
//! raft retransmits — and reported so the leader stops pipelining to it.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use piehole_protocol::pb;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::DriverMsg;
use crate::config::NodeConfig;
use crate::peer_client::{self, PeerAuth};

/// A peer counts as reachable if a call to it succeeded this recently.
const REACHABLE_FOR: Duration = Duration::from_secs(3);
/// An idle sender pings so reachability stays current on followers too.
const PING_EVERY: Duration = Duration::from_millis(500);
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

/// Starts the senders; returns the function the driver hands outgoing messages to.
pub fn start(
    config: &NodeConfig,
    auth: PeerAuth,
    inbox: mpsc::Sender<DriverMsg>,
    health: Arc<PeerHealth>,
) -> Box<dyn Fn(Vec<Message>) + Send> {
    let mut queues: HashMap<u64, UnboundedSender<Message>> = HashMap::new();
    for (&id, addr) in &config.peers {
        if id == config.id {
            continue;
        }
        let (tx, rx) = unbounded_channel();
        queues.insert(id, tx);
        let sender = PeerSender {
            from: config.id,
            to: id,
            addr: addr.clone(),
            auth: auth.clone(),
            inbox: inbox.clone(),
            health: health.clone(),
        };
        tokio::spawn(sender.run(rx));
    }
    Box::new(move |msgs: Vec<Message>| {
        for m in msgs {
            if let Some(q) = queues.get(&m.to) {
                let _ = q.send(m);
            }
        }
    })
}

struct PeerSender {
    from: u64,
    to: u64,
    addr: String,
    auth: PeerAuth,
    inbox: mpsc::Sender<DriverMsg>,
    health: Arc<PeerHealth>,
}

impl PeerSender {
    async fn run(self, mut rx: UnboundedReceiver<Message>) {
        let mut client = match peer_client::connect(&self.addr, &self.auth) {
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
            let snapshots: Vec<u64> = batch
                .iter()
                .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
                .map(|m| m.to)
                .collect();
            let messages = batch
                .iter()
                .filter_map(|m| m.write_to_bytes().ok())
                .collect();
            let req = pb::RaftBatch {
                from: self.from,
                messages,
            };
            match client.raft(req).await {
                Ok(_) => {
                    self.health.mark(self.to);
                    for to in snapshots {
                        let _ = self.inbox.send(DriverMsg::SnapshotSent { to, ok: true });
                    }
                }
                Err(status) => {
                    self.health.mark_failed(self.to);
                    tracing::debug!(peer = self.to, error = %status.message(), "raft send failed");
                    if !batch.is_empty() {
                        let _ = self.inbox.send(DriverMsg::Unreachable(self.to));
                    }
                    for to in snapshots {
                        let _ = self.inbox.send(DriverMsg::SnapshotSent { to, ok: false });
                    }
                }
            }
        }
    }
}
