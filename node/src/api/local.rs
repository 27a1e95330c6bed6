//! The local API: what hooks and the CLI ask of their own node. Reached only
//! through the node's Unix socket, so file permissions are the access control.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use piehole_protocol::pb::{self, local_server::Local};
use piehole_protocol::validate;
use tonic::{Request, Response, Status};

use super::{consensus_status, invalid};
use crate::consensus::Consensus;
use crate::peer_client::{self, PeerAuth};
use crate::replicator::Replicator;
use crate::update_rule::{self, Decision};

pub struct LocalService {
    pub consensus: Arc<dyn Consensus>,
    pub replicator: Arc<Replicator>,
    pub peers: BTreeMap<u64, String>,
    pub auth: PeerAuth,
}

fn opt(id: &str) -> Option<&str> {
    (!id.is_empty()).then_some(id)
}

fn check_ref(group: &str, ref_name: &str, ids: &[&str]) -> Result<(), Status> {
    validate::group_name(group).map_err(invalid)?;
    validate::ref_name(ref_name).map_err(invalid)?;
    for id in ids {
        validate::object_id(id).map_err(invalid)?;
    }
    Ok(())
}

/// The canonical absolute path a hook or install names; hooks run with the
/// repository as their working directory, so the path they send is absolute.
fn repo_path(p: &str) -> Result<PathBuf, Status> {
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "repository path {p:?} is not absolute"
        )));
    }
    path.canonicalize()
        .map_err(|e| Status::invalid_argument(format!("repository path {p:?}: {e}")))
}

impl LocalService {
    /// The first repository of a new group brings its refs with it. A CAS
    /// from "absent" never overwrites a value already seeded.
    async fn seed_empty_group(&self, group: &str, path: &Path) -> Result<u64, Status> {
        let view = self
            .consensus
            .group(group, true)
            .await
            .map_err(consensus_status)?;
        // Only while no replica is registered anywhere: a seed cut short (no
        // quorum, say) is finished by running install again.
        if !view.replicas.is_empty() {
            return Ok(0);
        }
        let repo_path = path.to_path_buf();
        let refs = update_rule::blocking(move || {
            let repo = piehole_repo::Replica::open(&repo_path)?;
            let mut complete = BTreeMap::new();
            for (name, id) in repo.refs()? {
                if validate::ref_name(&name).is_ok() && repo.is_complete(&id)? {
                    complete.insert(name, id);
                }
            }
            Ok(complete)
        })
        .await
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let mut seeded = 0;
        for (name, id) in refs {
            let out = self
                .consensus
                .cas(group, &name, None, Some(&id))
                .await
                .map_err(consensus_status)?;
            if out.applied {
                seeded += 1;
            }
        }
        Ok(seeded)
    }

    async fn hook_group(&self, given: &str) -> Result<(PathBuf, String), Status> {
        let path = repo_path(given)?;
        let group = self.replicator.group_at(&path).ok_or_else(|| {
            Status::failed_precondition(format!(
                "{} is not registered with the local piehole node (run `piehole install` in it)",
                path.display()
            ))
        })?;
        Ok((path, group))
    }
}

#[tonic::async_trait]
impl Local for LocalService {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let s = self.consensus.status();
        let (groups, refs) = self.consensus.counts();
        let mut lag = self.replicator.lag();
        if req.into_inner().include_peers {
            for (&id, addr) in &self.peers {
                if id == s.node_id {
                    continue;
                }
                let Ok(mut client) = peer_client::connect(addr, &self.auth) else {
                    continue;
                };
                let call = client.peer_status(pb::PeerStatusRequest {});
                if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(1), call).await {
                    lag.extend(reply.into_inner().lag);
                }
            }
        }
        Ok(Response::new(pb::StatusReply {
            node_id: s.node_id,
            leader_id: s.leader_id,
            term: s.term,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            first_log_index: s.first_log_index,
            snapshot_index: s.snapshot_index,
            snapshots_installed: s.snapshots_installed,
            members: s
                .members
                .into_iter()
                .map(|m| pb::Member {
                    id: m.id,
                    addr: m.addr,
                    reachable: m.reachable,
                })
                .collect(),
            groups,
            refs,
            lag,
            backend: s.backend.to_string(),
        }))
    }

    async fn cas(&self, req: Request<pb::CasRequest>) -> Result<Response<pb::CasReply>, Status> {
        let r = req.into_inner();
        check_ref(&r.group, &r.ref_name, &[&r.expected, &r.new])?;
        let out = self
            .consensus
            .cas(&r.group, &r.ref_name, opt(&r.expected), opt(&r.new))
            .await
            .map_err(consensus_status)?;
        Ok(Response::new(pb::CasReply {
            applied: out.applied,
            current: out.current.unwrap_or_default(),
        }))
    }

    async fn read_refs(
        &self,
        req: Request<pb::ReadRefsRequest>,
    ) -> Result<Response<pb::ReadRefsReply>, Status> {
        let r = req.into_inner();
        validate::group_name(&r.group).map_err(invalid)?;
        let view = self
            .consensus
            .group(&r.group, r.linearizable)
            .await
            .map_err(consensus_status)?;
        Ok(Response::new(pb::ReadRefsReply {
            refs: view
                .refs
                .into_iter()
                .map(|(ref_name, v)| pb::ConsensusRef {
                    ref_name,
                    value: v.value,
                    proposer: v.proposer,
                })
                .collect(),
            replicas: view
                .replicas
                .into_iter()
                .map(|(node_id, path)| pb::Replica { node_id, path })
                .collect(),
        }))
    }

    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        let r = req.into_inner();
        validate::group_name(&r.group).map_err(invalid)?;
        let path = repo_path(&r.path)?;
        let check = path.clone();
        update_rule::blocking(move || piehole_repo::Replica::open(&check).map(|_| ()))
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(other) = self.replicator.group_at(&path).filter(|g| g != &r.group) {
            return Err(Status::already_exists(format!(
                "{} is already registered as group {other}",
                path.display()
            )));
        }
        let path_s = path
            .to_str()
            .ok_or_else(|| Status::invalid_argument("repository path is not UTF-8"))?;
        // Seed before registering: once registered, the replicator makes the
        // repository follow the (empty) group and its refs would be gone.
        let seeded = self.seed_empty_group(&r.group, &path).await?;
        self.consensus
            .register(&r.group, self.consensus.node_id(), path_s)
            .await
            .map_err(consensus_status)?;
        self.replicator.nudge(&r.group);
        Ok(Response::new(pb::RegisterReply { seeded }))
    }

    async fn clobber(
        &self,
        req: Request<pb::ClobberRequest>,
    ) -> Result<Response<pb::ClobberReply>, Status> {
        let r = req.into_inner();
        validate::group_name(&r.group).map_err(invalid)?;
        let mut refs = BTreeMap::new();
        for c in r.refs {
            check_ref(&r.group, &c.ref_name, &[&c.value])?;
            if c.value.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "{}: empty value",
                    c.ref_name
                )));
            }
            refs.insert(c.ref_name, c.value);
        }
        self.consensus
            .clobber(&r.group, refs)
            .await
            .map_err(consensus_status)?;
        Ok(Response::new(pb::ClobberReply {}))
    }

    async fn hook_update(
        &self,
        req: Request<pb::HookUpdateRequest>,
    ) -> Result<Response<pb::HookUpdateReply>, Status> {
        let r = req.into_inner();
        validate::object_id(&r.old).map_err(invalid)?;
        validate::object_id(&r.new).map_err(invalid)?;
        if r.ref_name.starts_with("refs/remotes/") || !r.ref_name.starts_with("refs/") {
            // Not replicated: git decides alone.
            return Ok(Response::new(pb::HookUpdateReply {
                accepted: true,
                message: String::new(),
            }));
        }
        validate::ref_name(&r.ref_name).map_err(invalid)?;
        let (path, group) = self.hook_group(&r.repo_path).await?;
        let decision = update_rule::decide(
            self.consensus.as_ref(),
            &self.replicator,
            &group,
            &path,
            &r.ref_name,
            opt(&r.old).map(String::from),
            opt(&r.new).map(String::from),
        )
        .await
        .map_err(consensus_status)?;
        let (accepted, message) = match decision {
            Decision::Accept => (true, String::new()),
            Decision::Reject(m) => (false, m),
        };
        Ok(Response::new(pb::HookUpdateReply { accepted, message }))
    }

    async fn hook_post_update(
        &self,
        req: Request<pb::HookPostUpdateRequest>,
    ) -> Result<Response<pb::HookPostUpdateReply>, Status> {
        let r = req.into_inner();
        let (_, group) = self.hook_group(&r.repo_path).await?;
        self.replicator.release(&group, &r.ref_names);
        self.replicator.nudge(&group);
        Ok(Response::new(pb::HookPostUpdateReply {}))
    }
}
