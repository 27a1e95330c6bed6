//! The peer API: raft messages in, packs out, status for `piehole status`.
//! Every call must carry the cluster secret (when one is set) and come from
//! a known member; anything else is refused and logged.

use std::pin::Pin;
use std::sync::{mpsc, Arc};

use piehole_protocol::limits::{FROM_HEADER, SECRET_HEADER};
use piehole_protocol::pb::{self, peer_server::Peer};
use piehole_protocol::validate;
use prost::Message as _;
use protobuf::Message as _;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use super::invalid;
use crate::consensus::raft::DriverMsg;
use crate::consensus::Consensus;
use crate::replicator::Replicator;

pub struct PeerService {
    /// Where raft messages go; None when etcd holds the consensus.
    pub inbox: Option<mpsc::Sender<DriverMsg>>,
    pub replicator: Arc<Replicator>,
    pub self_id: u64,
}

/// Checks the secret and the caller's id on every peer call.
#[derive(Clone)]
pub struct PeerGate {
    pub secret: Option<Arc<str>>,
    pub consensus: Arc<dyn Consensus>,
}

impl tonic::service::Interceptor for PeerGate {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let md = req.metadata();
        let from = md
            .get(FROM_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let remote = req.remote_addr();
        let Some(from) = from.filter(|f| self.consensus.peers().contains_key(f)) else {
            tracing::warn!(?remote, "peer call from an unknown node refused");
            return Err(Status::permission_denied("unknown peer"));
        };
        if let Some(secret) = &self.secret {
            let given = md
                .get(SECRET_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !constant_time_eq(given, secret.as_bytes()) {
                tracing::warn!(
                    ?remote,
                    from,
                    "peer call with a wrong cluster secret refused"
                );
                return Err(Status::unauthenticated("wrong cluster secret"));
            }
        }
        Ok(req)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

type PackStream = Pin<Box<dyn Stream<Item = Result<pb::PackChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft(&self, req: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
        // The gate admitted the caller by this header; the batch must agree.
        let caller = req
            .metadata()
            .get(FROM_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let Some(inbox) = &self.inbox else {
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
        let mut msgs = Vec::with_capacity(batch.messages.len());
        for bytes in &batch.messages {
            let m = raft::prelude::Message::parse_from_bytes(bytes)
                .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))?;
            if m.from != batch.from || m.to != self.self_id {
                return Err(Status::invalid_argument(
                    "raft message is not from the caller or not for this node",
                ));
            }
            // A snapshot the state machine could not restore would stop the
            // node once raft had accepted it: check it at the door.
            if m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot
                && pb::StateSnapshot::decode(&m.get_snapshot().data[..]).is_err()
            {
                return Err(Status::invalid_argument("undecodable snapshot data"));
            }
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
        let chunks = self
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
        let replicator = self.replicator.clone();
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
        _req: Request<pb::PeerStatusRequest>,
    ) -> Result<Response<pb::PeerStatusReply>, Status> {
        let (lag, omitted) = self.replicator.lag();
        Ok(Response::new(pb::PeerStatusReply { lag, omitted }))
    }
}
