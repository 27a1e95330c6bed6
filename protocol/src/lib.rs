//! piehole's wire format.
//!
//! - [`pb`]: the prost/tonic types generated from `proto/piehole.proto`: the
//!   local API (`Local`), the peer API (`Peer`) and the replicated `Command`.
//! - [`validate`]: checks every value that arrives from git, the network or
//!   the command line before anything acts on it.
//! - [`limits`]: sizes shared by both ends of a connection.

pub mod validate;

#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("piehole.v1");
}

pub mod limits {
    /// Largest local API message, either way: a push of 100,000 refs, the
    /// status of a big group.
    pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
    /// Largest peer API message (a raft snapshot of a big state, a batch).
    pub const MAX_PEER_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
    /// Chunk size of a streamed pack.
    pub const PACK_CHUNK_BYTES: usize = 256 * 1024;
    /// Metadata key carrying the cluster secret on peer calls.
    pub const SECRET_HEADER: &str = "x-piehole-secret";
    /// Metadata key naming the calling node on peer calls.
    pub const FROM_HEADER: &str = "x-piehole-from";
    /// Metadata key naming the caller's cluster id (16 hex digits) on peer
    /// calls; absent before the caller has bootstrapped or joined.
    pub const CLUSTER_HEADER: &str = "x-piehole-cluster";
}
