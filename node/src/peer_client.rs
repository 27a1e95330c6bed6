//! A client for a peer's API, with the cluster secret attached to every call.

use std::sync::Arc;
use std::time::Duration;

use piehole_protocol::limits::{
    CLUSTER_HEADER, FROM_HEADER, MAX_PEER_MESSAGE_BYTES, SECRET_HEADER,
};
use piehole_protocol::pb::peer_client::PeerClient as GrpcPeerClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Who we are and the secret we prove it with.
#[derive(Clone)]
pub struct PeerAuth {
    pub from: u64,
    pub secret: Option<Arc<str>>,
    /// Our cluster's id, once bootstrapped or joined (embedded Raft only).
    pub cluster: Option<u64>,
}

impl tonic::service::Interceptor for PeerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let md = req.metadata_mut();
        md.insert(FROM_HEADER, MetadataValue::from(self.from));
        if let Some(cluster) = self.cluster {
            let hex = crate::consensus::raft::bootstrap::cluster_hex(cluster);
            if let Ok(v) = MetadataValue::try_from(hex) {
                md.insert(CLUSTER_HEADER, v);
            }
        }
        if let Some(secret) = &self.secret {
            let v = MetadataValue::try_from(secret.as_ref())
                .map_err(|_| tonic::Status::internal("cluster secret is not valid header text"))?;
            md.insert(SECRET_HEADER, v);
        }
        Ok(req)
    }
}

pub type PeerClient = GrpcPeerClient<InterceptedService<Channel, PeerAuth>>;

/// Connects lazily: the first call dials, a dead peer fails fast.
///
/// No deadline covers a whole call here, since a pack of a large repository
/// legitimately streams for long; callers bound each call or each chunk.
/// HTTP/2 keepalive finds a connection whose packets vanish (a peer frozen
/// or cut off) within a few seconds, idle or not, and fails what is on it.
pub fn connect(addr: &str, auth: &PeerAuth) -> anyhow::Result<PeerClient> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(GrpcPeerClient::with_interceptor(channel, auth.clone())
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES))
}
