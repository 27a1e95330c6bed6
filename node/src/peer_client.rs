//! A client for a peer's API, with the cluster secret attached to every call.

use std::sync::Arc;
use std::time::Duration;

use piehole_protocol::limits::{
    CLUSTER_HEADER, FROM_HEADER, MAX_PEER_MESSAGE_BYTES, SECRET_HEADER,
};
use piehole_protocol::pb::peer_client::PeerClient as GrpcPeerClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The usual cause of a peer refusing our secret, for the operator.
pub const SECRET_HINT: &str = "every member must be given the same --cluster-secret-file \
     (on loopback, a node given none uses the one it generated in its data dir, cluster-secret)";

/// A peer's refusal as one line; a refused secret with its usual cause.
pub fn refusal(status: &tonic::Status) -> String {
    if status.code() == tonic::Code::Unauthenticated {
        format!("{}: {SECRET_HINT}", status.message())
    } else {
        status.message().to_string()
    }
}

/// Who we are and the secret we prove it with.
#[derive(Clone)]
pub struct PeerAuth {
    pub from: u64,
    pub secret: Option<Arc<str>>,
    /// Our cluster's id, once bootstrapped or joined (embedded Raft only).
    pub cluster: Option<u64>,
    /// Mutual TLS on the peer port: our certificate, and the CA a peer's
    /// must be signed by.
    pub tls: Option<Arc<PeerTls>>,
}

/// `--tls-cert`, `--tls-key`, `--tls-ca`, as PEM.
#[derive(Debug)]
pub struct PeerTls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Vec<u8>,
}

/// The DNS name a node's certificate must carry (as a subjectAltName):
/// what binds a node id to a certificate, both ways.
pub fn node_name(id: u64) -> String {
    format!("node-{id}.piehole")
}

impl PeerTls {
    pub fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    fn client_config(&self, to: u64) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(node_name(to))
    }
}

/// Whether `cert` (DER) names node `id`. The chain was verified against the
/// CA during the handshake; this checks whose it is.
pub fn certificate_is_node(cert: &[u8], id: u64) -> bool {
    let der = rustls_pki_types::CertificateDer::from(cert);
    let Ok(end) = webpki::EndEntityCert::try_from(&der) else {
        return false;
    };
    let Ok(name) = rustls_pki_types::ServerName::try_from(node_name(id)) else {
        return false;
    };
    end.verify_is_valid_for_subject_name(&name).is_ok()
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
///
/// With TLS, `to` is the node expected at `addr`: its certificate must
/// name it. Without TLS it is not needed.
pub fn connect(to: Option<u64>, addr: &str, auth: &PeerAuth) -> anyhow::Result<PeerClient> {
    let scheme = if auth.tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?;
    if let Some(tls) = &auth.tls {
        let to = to.ok_or_else(|| {
            anyhow::anyhow!(
                "with TLS the id of the node at {addr} must be known (--join ID=HOST:PORT)"
            )
        })?;
        endpoint = endpoint.tls_config(tls.client_config(to))?;
    }
    let channel = endpoint
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
