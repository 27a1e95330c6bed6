//! Durability levels (SPEC §5).
//!
//! `local`: a push is acknowledged once the receiving replica has its
//! objects and the consensus has committed its refs. If that host is
//! destroyed before a peer fetched the objects, the consensus names commits
//! nobody has until the user pushes again or an operator clobbers.
//!
//! `quorum`: before the refs are proposed, enough other replicas fetch the
//! objects and fsync them that a majority of the cluster holds them, so
//! destroying any minority of hosts loses no acknowledged push.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use piehole_protocol::pb;
use tokio::task::JoinSet;

use crate::consensus::Consensus;
use crate::peer_client::{self, PeerAuth};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    #[default]
    Local,
    Quorum,
}

impl FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Durability::Local),
            "quorum" => Ok(Durability::Quorum),
            other => Err(format!(
                "--durability {other:?} is not one of: local, quorum"
            )),
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Durability::Local => "local",
            Durability::Quorum => "quorum",
        })
    }
}

/// Stores a push's objects on a majority before its refs are proposed.
pub struct ObjectQuorum {
    pub level: Durability,
    pub consensus: Arc<dyn Consensus>,
    pub auth: PeerAuth,
}

impl ObjectQuorum {
    /// Ok once `wants` of `group` are stored on a majority of the cluster
    /// (this node included), or at once with `local` durability. Gives up
    /// at `deadline`: a push that cannot reach a majority in time is refused.
    pub async fn store(
        &self,
        group: &str,
        wants: Vec<String>,
        deadline: Instant,
    ) -> Result<(), String> {
        // This node has the objects; a majority needs this many more.
        let peers = self.consensus.peers();
        let needed = self.consensus.voter_count() / 2;
        if self.level == Durability::Local || wants.is_empty() || needed == 0 {
            return Ok(());
        }
        let me = self.consensus.node_id();
        let view = self
            .consensus
            .local_group(group)
            .map_err(|e| e.to_string())?;
        let holders: Vec<(u64, String)> = view
            .replicas
            .keys()
            .filter(|&&id| id != me)
            .filter_map(|id| peers.get(id).map(|a| (*id, a.clone())))
            .collect();
        if holders.len() < needed {
            return Err(format!(
                "durability quorum: group {group} has replicas on {} other nodes, {needed} must store the objects",
                holders.len()
            ));
        }
        let mut calls = JoinSet::new();
        for (id, addr) in holders.iter().cloned() {
            let req = pb::StoreObjectsRequest {
                group: group.to_string(),
                wants: wants.clone(),
                source: me,
            };
            let auth = self.auth.clone();
            let timeout = deadline.saturating_duration_since(Instant::now());
            calls.spawn(async move {
                let mut client =
                    peer_client::connect(Some(id), &addr, &auth).map_err(|e| e.to_string())?;
                match tokio::time::timeout(timeout, client.store_objects(req)).await {
                    Ok(Ok(_)) => Ok(id),
                    Ok(Err(s)) => Err(format!("node {id}: {}", s.message())),
                    Err(_) => Err(format!("node {id}: no answer within {timeout:?}")),
                }
            });
        }
        let (mut stored, mut failed) = (0, Vec::new());
        while let Some(done) = calls.join_next().await {
            match done {
                Ok(Ok(_)) => stored += 1,
                Ok(Err(e)) => failed.push(e),
                Err(e) => failed.push(e.to_string()),
            }
            if stored >= needed {
                // The rest carry on detached; their copies help replication.
                calls.detach_all();
                return Ok(());
            }
            if holders.len() - failed.len() < needed {
                break;
            }
        }
        // Those still copying go on (their copies help the next try).
        calls.detach_all();
        Err(format!(
            "durability quorum: the objects reached {stored} of the {needed} other nodes needed ({})",
            failed.join("; ")
        ))
    }
}
