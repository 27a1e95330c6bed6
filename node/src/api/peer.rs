//! The peer API: raft messages in, packs out, status for `piehole status`.
//! Every call must carry the cluster secret (when one is set). Every call
//! but ClusterInfo must also come from a current member of this node's
//! cluster; anything else is refused and logged.

use std::pin::Pin;
use std::sync::{mpsc, Arc, OnceLock};

use piehole_protocol::limits::{CLUSTER_HEADER, FROM_HEADER, SECRET_HEADER};
use piehole_protocol::pb::{self, peer_server::Peer};
use piehole_protocol::validate;
use prost::Message as _;
use protobuf::Message as _;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use super::invalid;
use crate::access::{RepoRoots, REFUSALS};
use crate::consensus::raft::bootstrap::{cluster_hex, Identity};
use crate::consensus::raft::{DriverMsg, REMOVED_MARK};
use crate::consensus::{Consensus, ConsensusError, MemberChange};
use crate::replicator::Replicator;

/// What the peer API serves once consensus runs; until then (a new cluster
/// bootstrapping) only ClusterInfo is answered.
pub struct PeerParts {
    /// Where raft messages go; None when etcd holds the consensus.
    pub inbox: Option<mpsc::Sender<DriverMsg>>,
    pub replicator: Arc<Replicator>,
    pub consensus: Arc<dyn Consensus>,
}

pub struct PeerService {
    pub parts: Arc<OnceLock<PeerParts>>,
    /// The embedded Raft's answer to ClusterInfo; None in etcd mode.
    pub identity: Option<Arc<Identity>>,
    pub self_id: u64,
    /// `--repo-root`: a proposal registering a replica of this node
    /// elsewhere is refused at the door.
    pub roots: RepoRoots,
    /// Mutual TLS: the node id a caller claims must be its certificate's.
    pub tls: bool,
    /// Tells the accept loop which connections are members'.
    pub vouch: crate::listener::Vouch,
}

/// Checks the cluster secret on every peer call, before anything else.
#[derive(Clone)]
pub struct PeerGate {
    pub secret: Option<Arc<str>>,
}

impl tonic::service::Interceptor for PeerGate {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(secret) = &self.secret {
            let given = req
                .metadata()
                .get(SECRET_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !constant_time_eq(given, secret.as_bytes()) {
                let remote = req.remote_addr().map(|a| a.ip());
                if REFUSALS.allow(&format!("secret {remote:?}")) {
                    tracing::warn!(
                        ?remote,
                        "peer call with a wrong cluster secret refused; {}",
                        crate::peer_client::SECRET_HINT
                    );
                }
                return Err(Status::unauthenticated("wrong cluster secret"));
            }
        }
        Ok(req)
    }
}

impl PeerService {
    /// The running node's parts, if the caller is a current member of our
    /// cluster. A removed node is told so, and stops.
    fn member<T>(&self, req: &Request<T>) -> Result<(&PeerParts, u64), Status> {
        self.caller(req, false)
    }

    /// [`PeerService::member`]; with `newcomer`, also a caller that is not
    /// (yet) among this node's members but was never removed: raft traffic
    /// from a member added while this node was behind.
    fn caller<T>(&self, req: &Request<T>, newcomer: bool) -> Result<(&PeerParts, u64), Status> {
        let parts = self
            .parts
            .get()
            .ok_or_else(|| Status::unavailable("this node is still starting"))?;
        let md = req.metadata();
        let from = md
            .get(FROM_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let remote = req.remote_addr();
        if let Some(ours) = parts.consensus.cluster_id() {
            let theirs = md.get(CLUSTER_HEADER).and_then(|v| v.to_str().ok());
            if theirs != Some(cluster_hex(ours).as_str()) {
                if REFUSALS.allow(&format!("cluster {:?}", remote.map(|a| a.ip()))) {
                    tracing::warn!(?remote, ?from, cluster = ?theirs, "peer call from another cluster refused");
                }
                return Err(Status::permission_denied(format!(
                    "this node belongs to cluster {}, not {}",
                    cluster_hex(ours),
                    theirs.unwrap_or("(none)")
                )));
            }
        }
        let Some(from) = from else {
            return Err(Status::permission_denied("unknown peer"));
        };
        if self.tls && !Self::certified_as(req, from) {
            if REFUSALS.allow(&format!("certificate {:?}", remote.map(|a| a.ip()))) {
                tracing::warn!(
                    ?remote,
                    from,
                    "peer call whose certificate is not the node it claims refused"
                );
            }
            return Err(Status::permission_denied(format!(
                "the caller's certificate does not name node {from} ({})",
                crate::peer_client::node_name(from)
            )));
        }
        if parts.consensus.was_removed(from) {
            if REFUSALS.allow(&format!("removed {:?}", remote.map(|a| a.ip()))) {
                tracing::warn!(?remote, from, "peer call from a removed member refused");
            }
            return Err(Status::permission_denied(format!(
                "node {from} {REMOVED_MARK}"
            )));
        }
        if !newcomer && !parts.consensus.peers().contains_key(&from) {
            if REFUSALS.allow(&format!("unknown {:?}", remote.map(|a| a.ip()))) {
                tracing::warn!(?remote, from, "peer call from an unknown node refused");
            }
            return Err(Status::permission_denied("unknown peer"));
        }
        self.vouch_for(req);
        Ok((parts, from))
    }

    /// Tells the accept loop that the connection of `req` is a member's.
    fn vouch_for<T>(&self, req: &Request<T>) {
        let info = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>();
        if let Some((Some(local), Some(remote))) = info.map(|i| (i.local_addr(), i.remote_addr())) {
            self.vouch.vouch(local, remote);
        }
    }
}

impl PeerService {
    /// Whether the client certificate of the call names node `id`.
    fn certified_as<T>(req: &Request<T>, id: u64) -> bool {
        req.peer_certs()
            .and_then(|certs| certs.first().cloned())
            .is_some_and(|cert| crate::peer_client::certificate_is_node(&cert, id))
    }

    /// What raft would accept but this node must not: a snapshot the state
    /// machine could not restore (it would stop the node once raft had
    /// taken it), and proposals that are not valid commands or that name a
    /// replica of this node outside its repository roots. The state machine
    /// checks every command again when it applies it.
    fn check_at_the_door(&self, m: &raft::prelude::Message, from: u64) -> Result<(), Status> {
        use raft::prelude::{EntryType, MessageType};
        match m.get_msg_type() {
            MessageType::MsgSnapshot => {
                let snap = pb::StateSnapshot::decode(&m.get_snapshot().data[..])
                    .map_err(|_| Status::invalid_argument("undecodable snapshot data"))?;
                validate::snapshot(&snap).map_err(invalid)
            }
            MessageType::MsgPropose => {
                for e in m.get_entries() {
                    // Members hand their membership changes to the leader
                    // through ChangeMember, never as raw proposals.
                    if e.get_entry_type() != EntryType::EntryNormal {
                        return Err(Status::invalid_argument(
                            "a configuration change proposed by a peer",
                        ));
                    }
                    if e.data.is_empty() {
                        continue;
                    }
                    let cmd = pb::Command::decode(&e.data[..]).map_err(|_| {
                        Status::invalid_argument("undecodable command in a proposal")
                    })?;
                    validate::command(&cmd).map_err(invalid)?;
                    // A peer forwards its own proposals only: one in
                    // another node's name would answer that node's request.
                    if cmd.origin_node != from {
                        return Err(Status::permission_denied(format!(
                            "node {from} proposed a command in node {}'s name",
                            cmd.origin_node
                        )));
                    }
                    if let Some(pb::command::Op::Register(r)) = &cmd.op {
                        if r.node_id == self.self_id {
                            self.roots
                                .check(std::path::Path::new(&r.path))
                                .map_err(Status::permission_denied)?;
                        }
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

type PackStream = Pin<Box<dyn Stream<Item = Result<pb::PackChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft(&self, req: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
        let (parts, caller) = self.caller(&req, true)?;
        let caller = Some(caller);
        let Some(inbox) = &parts.inbox else {
            return Err(Status::failed_precondition(
                "this node keeps its consensus in etcd, not in the embedded Raft",
            ));
        };
        let batch = req.into_inner();
        if caller != Some(batch.from) {
            return Err(Status::invalid_argument(
                "raft batch sender does not match the caller",
            ));
        }
        if !parts.consensus.peers().contains_key(&batch.from) {
            parts.consensus.learn_peer(batch.from, &batch.from_addr);
        }
        let mut msgs = Vec::with_capacity(batch.messages.len());
        for bytes in &batch.messages {
            let m = raft::prelude::Message::parse_from_bytes(bytes)
                .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))?;
            if m.from != batch.from || m.to != self.self_id {
                return Err(Status::invalid_argument(
                    "raft message is not from the caller or not for this node",
                ));
            }
            self.check_at_the_door(&m, batch.from)?;
            msgs.push(m);
        }
        if !msgs.is_empty() {
            inbox
                .send(DriverMsg::Raft(msgs))
                .map_err(|_| Status::unavailable("node is shutting down"))?;
        }
        Ok(Response::new(pb::RaftAck {}))
    }

    type FetchPackStream = PackStream;

    async fn fetch_pack(
        &self,
        req: Request<pb::FetchPackRequest>,
    ) -> Result<Response<PackStream>, Status> {
        let (parts, _) = self.member(&req)?;
        let req = req.into_inner();
        validate::group_name(&req.group).map_err(invalid)?;
        if req.wants.is_empty() {
            return Err(Status::invalid_argument("fetch with no wants"));
        }
        for id in req.wants.iter().chain(&req.haves) {
            if id.is_empty() {
                return Err(Status::invalid_argument("empty object id"));
            }
            validate::object_id(id).map_err(invalid)?;
        }
        let chunks = parts
            .replicator
            .serve_pack(&req.group, req.wants, req.haves)
            .await
            .map_err(Status::not_found)?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(chunks)
            .map(|c| c.map_err(Status::internal));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn store_objects(
        &self,
        req: Request<pb::StoreObjectsRequest>,
    ) -> Result<Response<pb::StoreObjectsReply>, Status> {
        let (parts, _) = self.member(&req)?;
        let req = req.into_inner();
        validate::group_name(&req.group).map_err(invalid)?;
        if req.wants.is_empty() {
            return Err(Status::invalid_argument("store with no wants"));
        }
        for id in &req.wants {
            if id.is_empty() {
                return Err(Status::invalid_argument("empty object id"));
            }
            validate::object_id(id).map_err(invalid)?;
        }
        // Detached: a caller that gave up (its deadline) does not waste the
        // transfer; its next try, or replication, finds the objects here.
        let replicator = parts.replicator.clone();
        let task = tokio::spawn(async move {
            replicator
                .store_objects(&req.group, req.wants, req.source)
                .await
        });
        task.await
            .map_err(|e| Status::internal(format!("store task failed: {e}")))?
            .map_err(Status::unavailable)?;
        Ok(Response::new(pb::StoreObjectsReply {}))
    }

    async fn peer_status(
        &self,
        req: Request<pb::PeerStatusRequest>,
    ) -> Result<Response<pb::PeerStatusReply>, Status> {
        let (parts, _) = self.member(&req)?;
        let (lag, omitted) = parts.replicator.lag();
        let progress = parts
            .consensus
            .status()
            .members
            .into_iter()
            .filter_map(|m| {
                m.progress.map(|(matched, lag)| pb::MemberProgress {
                    id: m.id,
                    matched,
                    lag,
                })
            })
            .collect();
        Ok(Response::new(pb::PeerStatusReply {
            lag,
            omitted,
            progress,
        }))
    }

    async fn cluster_info(
        &self,
        req: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoReply>, Status> {
        // Asked before the caller is a member (a founder, a joiner): with
        // TLS, still only by the node its certificate names.
        if self.tls {
            let from = req
                .metadata()
                .get(FROM_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if !from.is_some_and(|from| Self::certified_as(&req, from)) {
                return Err(Status::permission_denied(
                    "the caller's certificate does not name the node it claims to be",
                ));
            }
        }
        match &self.identity {
            Some(identity) => identity
                .info()
                .map(Response::new)
                .ok_or_else(|| Status::unavailable("this node is still starting")),
            None => Err(Status::failed_precondition(
                "this node keeps its consensus in etcd, not in the embedded Raft",
            )),
        }
    }

    async fn change_member(
        &self,
        req: Request<pb::MemberChangeRequest>,
    ) -> Result<Response<pb::MemberChangeReply>, Status> {
        let (parts, from) = self.member(&req)?;
        let change = member_change(req.into_inner())?;
        if let MemberChange::Claim { id, .. } = change {
            if id != from {
                return Err(Status::permission_denied("a node claims only its own id"));
            }
        }
        parts
            .consensus
            .change_member(change)
            .await
            .map_err(change_status)?;
        Ok(Response::new(pb::MemberChangeReply {}))
    }
}

/// A membership change as the wire carries it, checked.
pub fn member_change(req: pb::MemberChangeRequest) -> Result<MemberChange, Status> {
    if req.node_id == 0 {
        return Err(Status::invalid_argument("member ids are positive integers"));
    }
    match req.kind() {
        pb::MemberChangeKind::AddLearner => {
            let addr = req.addr.trim().to_string();
            let port_ok = addr
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
            if !port_ok {
                return Err(Status::invalid_argument(format!(
                    "member address {addr:?} is not HOST:PORT"
                )));
            }
            Ok(MemberChange::Add {
                id: req.node_id,
                addr,
            })
        }
        pb::MemberChangeKind::Remove => Ok(MemberChange::Remove { id: req.node_id }),
        pb::MemberChangeKind::Join => Ok(MemberChange::Claim {
            id: req.node_id,
            nonce: req.nonce,
        }),
        pb::MemberChangeKind::Promote => Err(Status::invalid_argument(
            "learners are promoted by the leader once they have caught up",
        )),
    }
}

/// How a membership change failed, for a caller across the wire: a refusal
/// changed nothing; "unavailable" means nothing was proposed; anything else
/// may still take effect.
pub fn change_status(e: ConsensusError) -> Status {
    match e {
        ConsensusError::Refused(_) => Status::failed_precondition(e.to_string()),
        ConsensusError::NoQuorum | ConsensusError::OutOfTime | ConsensusError::Unavailable(_) => {
            Status::unavailable(e.to_string())
        }
        ConsensusError::ShuttingDown => Status::unavailable(e.to_string()),
        _ => Status::aborted(e.to_string()),
    }
}
