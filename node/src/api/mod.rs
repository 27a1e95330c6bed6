//! The two faces of a node: the local API (hooks and CLI, Unix socket) and
//! the peer API (other nodes, TCP, authenticated by the cluster secret).

pub mod local;
pub mod peer;

use crate::consensus::ConsensusError;
use piehole_protocol::validate::InvalidInput;

pub(crate) fn consensus_status(e: ConsensusError) -> tonic::Status {
    match e {
        ConsensusError::NoQuorum
        | ConsensusError::LostQuorum
        | ConsensusError::ShuttingDown
        | ConsensusError::Unavailable(_) => tonic::Status::unavailable(e.to_string()),
        ConsensusError::TimedOut | ConsensusError::OutOfTime | ConsensusError::Uncertain(_) => {
            tonic::Status::deadline_exceeded(e.to_string())
        }
        ConsensusError::Refused(_) => tonic::Status::failed_precondition(e.to_string()),
    }
}

pub(crate) fn invalid(e: InvalidInput) -> tonic::Status {
    tonic::Status::invalid_argument(e.to_string())
}
