//! The local API: what hooks and the CLI ask of their own node. Reached only
//! through the node's Unix socket, so file permissions are the access control.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use piehole_protocol::pb::{self, local_server::Local};
use piehole_protocol::validate;
use piehole_repo::Replica;
use tonic::{Request, Response, Status};

use super::peer::{change_status, member_change};
use super::{consensus_status, invalid};
use crate::access::{Access, Caller};
use crate::consensus::raft::bootstrap::cluster_hex;
use crate::consensus::{Consensus, GroupView, RefUpdate};
use crate::durability::Durability;
use crate::peer_client::{self, PeerAuth};
use crate::push::Pushes;
use crate::replicator::Replicator;
use crate::update_rule::{blocking, Proposed, Verdict};

/// Most ref updates one push may carry (`git push --mirror` of a big repository).
const MAX_PUSH_REFS: usize = 100_000;
/// A new group's first refs go into the log this many to an entry.
const SEED_REFS_PER_ENTRY: usize = 10_000;

pub struct LocalService {
    pub consensus: Arc<dyn Consensus>,
    pub replicator: Arc<Replicator>,
    pub pushes: Arc<Pushes>,
    pub auth: PeerAuth,
    pub request_timeout: Duration,
    pub durability: Durability,
    /// Started with --paused: every write but an import is refused.
    pub paused: bool,
    /// Who may call what; where repositories may be.
    pub access: Access,
    /// `--max-groups`: a new group beyond it is refused.
    pub max_groups: u64,
    /// `--max-refs-per-group`: a push that would create refs beyond it is
    /// refused.
    pub max_refs_per_group: u64,
}

/// What a paused node says to a write.
const PAUSED: &str = "pushes are paused: this node was started with --paused \
                      (to move the consensus between backends); nothing was changed";

impl LocalService {
    fn refuse_if_paused(&self) -> Result<(), Status> {
        if self.paused {
            return Err(Status::unavailable(PAUSED));
        }
        Ok(())
    }
}

fn opt(id: &str) -> Option<String> {
    (!id.is_empty()).then(|| id.to_string())
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

fn repo_status(e: piehole_repo::RepoError) -> Status {
    Status::failed_precondition(e.to_string())
}

/// The repository's replicated refs whose objects are all here.
async fn complete_refs(path: &Path) -> Result<BTreeMap<String, String>, Status> {
    let p = path.to_path_buf();
    blocking(move || {
        let repo = Replica::open(&p)?;
        let mut checker = repo.completeness()?;
        let mut complete = BTreeMap::new();
        for (name, id) in repo.refs()? {
            if validate::ref_name(&name).is_ok() && checker.is_complete(&id)? {
                complete.insert(name, id);
            }
        }
        Ok(complete)
    })
    .await
    .map_err(repo_status)
}

impl LocalService {
    /// The first repository of a new group brings its refs with it, in one
    /// entry. A CAS from "absent" never overwrites a value already seeded.
    async fn seed(&self, group: &str, path: &Path) -> Result<u64, Status> {
        let updates: Vec<RefUpdate> = complete_refs(path)
            .await?
            .into_iter()
            .map(|(ref_name, id)| RefUpdate {
                ref_name,
                expected: None,
                new: Some(id),
            })
            .collect();
        let mut seeded = 0;
        // Entries of bounded size, however many refs the repository has.
        for chunk in updates.chunks(SEED_REFS_PER_ENTRY) {
            let deadline = Instant::now() + self.request_timeout;
            let out = self
                .consensus
                .update_refs(group, chunk.to_vec(), false, deadline)
                .await
                .map_err(consensus_status)?;
            seeded += out.iter().filter(|o| o.applied).count() as u64;
        }
        Ok(seeded)
    }

    /// Refs of the repository that following the group would delete, or
    /// move to a commit that does not contain them: name -> local value.
    async fn would_lose(
        &self,
        path: &Path,
        view: &GroupView,
    ) -> Result<BTreeMap<String, String>, Status> {
        let p = path.to_path_buf();
        let consensus: BTreeMap<String, String> = view
            .refs
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect();
        blocking(move || {
            let repo = Replica::open(&p)?;
            Ok(repo
                .refs()?
                .into_iter()
                .filter(|(name, local)| match consensus.get(name) {
                    None => true,
                    Some(c) => c != local && !repo.is_descendant(c, local),
                })
                .collect())
        })
        .await
        .map_err(repo_status)
    }

    /// Refuses a push creating `creates` refs in a group that would then
    /// hold more than `--max-refs-per-group`. Costs a count of the group's
    /// refs, and only for a push that creates refs.
    fn refuse_beyond_ref_quota(&self, group: &str, creates: u64) -> Result<(), Status> {
        if creates == 0 {
            return Ok(());
        }
        let max = self.max_refs_per_group;
        let held = self
            .consensus
            .local_group(group)
            .map_err(consensus_status)?
            .refs
            .len() as u64;
        if held + creates > max {
            return Err(Status::resource_exhausted(format!(
                "group {group} holds {held} refs and this push creates {creates}: beyond its \
                 --max-refs-per-group {max}; nothing was changed"
            )));
        }
        Ok(())
    }

    /// The repository a hook names and its group, if the caller may move
    /// its refs.
    async fn hook_group(&self, caller: &Caller, given: &str) -> Result<(PathBuf, String), Status> {
        let path = repo_path(given)?;
        self.access.require_writer(caller, &path, "a hook call")?;
        let group = self.replicator.group_at(&path).ok_or_else(|| {
            Status::failed_precondition(format!(
                "{} is not registered with the local piehole node (run `piehole install` in it)",
                path.display()
            ))
        })?;
        Ok((path, group))
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[tonic::async_trait]
impl Local for LocalService {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let s = self.consensus.status();
        let (groups, refs) = self.consensus.counts();
        let (mut lag, mut lag_omitted) = self.replicator.lag();
        // Only the leader knows how far each member's log is.
        let mut leader_progress = std::collections::BTreeMap::new();
        if req.into_inner().include_peers {
            for (&id, addr) in &self.consensus.peers() {
                if id == s.node_id {
                    continue;
                }
                let Ok(mut client) = peer_client::connect(Some(id), addr, &self.auth) else {
                    continue;
                };
                let call = client.peer_status(pb::PeerStatusRequest {});
                if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(1), call).await {
                    let reply = reply.into_inner();
                    lag.extend(reply.lag);
                    lag_omitted += reply.omitted;
                    if id == s.leader_id {
                        for p in reply.progress {
                            leader_progress.insert(p.id, (p.matched, p.lag));
                        }
                    }
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
                .map(|m| {
                    let progress = m.progress.or_else(|| leader_progress.get(&m.id).copied());
                    pb::Member {
                        id: m.id,
                        addr: m.addr,
                        reachable: m.reachable,
                        role: m.role.to_string(),
                        has_progress: progress.is_some(),
                        matched: progress.map_or(0, |p| p.0),
                        lag: progress.map_or(0, |p| p.1),
                    }
                })
                .collect(),
            cluster_id: if s.cluster_id == 0 {
                String::new()
            } else {
                cluster_hex(s.cluster_id)
            },
            groups,
            refs,
            lag,
            backend: s.backend.to_string(),
            store: s.store,
            request_timeout_ms: self.request_timeout.as_millis() as u64,
            durability: self.durability.to_string(),
            lag_omitted,
        }))
    }

    async fn cas(&self, req: Request<pb::CasRequest>) -> Result<Response<pb::CasReply>, Status> {
        self.access.require_admin(&req, "setting a ref by hand")?;
        self.refuse_if_paused()?;
        let r = req.into_inner();
        check_ref(&r.group, &r.ref_name, &[&r.expected, &r.new])?;
        let out = self
            .consensus
            .cas(
                &r.group,
                &r.ref_name,
                opt(&r.expected).as_deref(),
                opt(&r.new).as_deref(),
            )
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
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        validate::group_name(&r.group).map_err(invalid)?;
        if !self.access.is_admin(&caller) {
            // A group's refs are for those who can read its replica here.
            let path = self.replicator.local_path(&r.group).ok_or_else(|| {
                Status::permission_denied(format!(
                    "group {} has no replica on this node that uid {} could read",
                    r.group, caller.uid
                ))
            })?;
            self.access
                .require_reader(&caller, &path, "reading a group's refs")?;
        }
        let view = self
            .consensus
            .group(&r.group, r.linearizable)
            .await
            .map_err(consensus_status)?;
        let group = view.into_group_state(r.group);
        Ok(Response::new(pb::ReadRefsReply {
            refs: group.refs,
            replicas: group.replicas,
            version: group.version,
        }))
    }

    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        self.refuse_if_paused()?;
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        validate::group_name(&r.group).map_err(invalid)?;
        let path = repo_path(&r.path)?;
        self.access
            .roots
            .check(&path)
            .map_err(Status::permission_denied)?;
        self.access
            .require_writer(&caller, &path, "registering a repository")?;
        let check = path.clone();
        blocking(move || Replica::open(&check).map(|_| ()))
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
        let me = self.consensus.node_id();
        let view = self
            .consensus
            .group(&r.group, true)
            .await
            .map_err(consensus_status)?;
        let mut reply = pb::RegisterReply::default();
        let already = view.replicas.get(&me).map(String::as_str) == Some(path_s);
        // A group with refs but no replica left (its last replica's node was
        // removed) is not new either: whoever installs it gets its refs.
        if !already && (!view.replicas.is_empty() || !view.refs.is_empty()) {
            // Joining a group brings its objects into the repository, and
            // moving one's replica here redirects its pushes: neither is
            // for whoever can write some repository.
            self.access
                .admin_only(&caller, "joining a group that already has replicas")?;
        }
        if already {
            // Already this group's replica here: it follows the group already.
        } else if view.replicas.is_empty() {
            let (groups, _) = self.consensus.counts();
            if view.refs.is_empty() && groups >= self.max_groups {
                return Err(Status::resource_exhausted(format!(
                    "the cluster holds {groups} groups, its --max-groups; group {} was not created",
                    r.group
                )));
            }
            if r.dry_run {
                return Ok(Response::new(reply));
            }
            // Seed before registering: once registered, the replicator makes
            // the repository follow the (empty) group and its refs would be
            // gone. A seed cut short (no quorum, say) is finished by running
            // install again.
            reply.seeded = self.seed(&r.group, &path).await?;
        } else {
            let lose = self.would_lose(&path, &view).await?;
            if r.dry_run && (lose.is_empty() || r.force) {
                return Ok(Response::new(reply));
            }
            if !lose.is_empty() && !r.force {
                let names: Vec<&str> = lose.keys().map(String::as_str).collect();
                return Err(Status::failed_precondition(format!(
                    "group {} already has replicas, and following it would delete or rewind {} ref(s) of this repository: {}; \
                     `piehole install --force` joins anyway and keeps them under refs/piehole/kept/",
                    r.group,
                    lose.len(),
                    names.join(", ")
                )));
            }
            if !lose.is_empty() && !r.dry_run {
                let (p, prefix) = (path.clone(), format!("refs/piehole/kept/{}/", unix_secs()));
                reply.saved = blocking(move || {
                    piehole_repo::confine::confined(&p.clone(), || {
                        Replica::open(&p)?.keep_under(&prefix, &lose, "piehole: install --force")
                    })
                })
                .await
                .map_err(repo_status)?;
            }
        }
        if r.dry_run {
            return Ok(Response::new(reply));
        }
        self.consensus
            .register(&r.group, me, path_s)
            .await
            .map_err(consensus_status)?;
        self.replicator.nudge(&r.group);
        Ok(Response::new(reply))
    }

    async fn change_member(
        &self,
        req: Request<pb::MemberChangeRequest>,
    ) -> Result<Response<pb::MemberChangeReply>, Status> {
        self.access.require_admin(&req, "changing the members")?;
        let change = member_change(req.into_inner())?;
        if matches!(change, crate::consensus::MemberChange::Claim { .. }) {
            return Err(Status::invalid_argument(
                "an id is claimed by the joining node itself, at its first start with --join",
            ));
        }
        tracing::info!(?change, "membership change requested");
        self.consensus
            .change_member(change)
            .await
            .map_err(change_status)?;
        Ok(Response::new(pb::MemberChangeReply {}))
    }

    async fn clobber(
        &self,
        req: Request<pb::ClobberRequest>,
    ) -> Result<Response<pb::ClobberReply>, Status> {
        self.access.require_admin(&req, "clobber")?;
        self.refuse_if_paused()?;
        let r = req.into_inner();
        let path = repo_path(&r.repo_path)?;
        let group = self.replicator.group_at(&path).ok_or_else(|| {
            Status::failed_precondition(format!(
                "{} is not a registered replica of any group on this node; \
                 clobber from a replica installed with `piehole install`",
                path.display()
            ))
        })?;
        // The group first, then the replica under the group's lock: a push
        // landing in between bumps the version the clobber is made
        // conditional on, and no pass is half-way through moving refs here.
        let view = self
            .consensus
            .group(&group, true)
            .await
            .map_err(consensus_status)?;
        let p = path.clone();
        let local = self
            .pushes
            .local_refs
            .read(&group, move || {
                let repo = Replica::open(&p)?;
                let mut checker = repo.completeness()?;
                let mut refs = BTreeMap::new();
                for (name, id) in repo.refs()? {
                    if validate::ref_name(&name).is_err() {
                        continue;
                    }
                    if !checker.is_complete(&id)? {
                        return Err(piehole_repo::RepoError::MissingObject(format!(
                            "{id} ({name} points at it, but its history is incomplete here; refusing to make it the consensus)"
                        )));
                    }
                    refs.insert(name, id);
                }
                Ok(refs)
            })
            .await
            .map_err(repo_status)?;
        let removed: BTreeSet<&String> = view
            .refs
            .keys()
            .filter(|name| !local.contains_key(*name))
            .collect();
        if !removed.is_empty() && !r.prune {
            let names: Vec<&str> = removed.iter().map(|s| s.as_str()).collect();
            return Err(Status::failed_precondition(format!(
                "this repository lacks {} ref(s) the group has: {}; `piehole clobber --prune` removes them from the group",
                names.len(),
                names.join(", ")
            )));
        }
        let reply = pb::ClobberReply {
            group: group.clone(),
            refs: local.len() as u64,
            removed: removed.len() as u64,
        };
        // Only if nothing landed since the group was read above: a push
        // acknowledged meanwhile is never undone unseen.
        self.consensus
            .clobber(&group, local, view.version)
            .await
            .map_err(consensus_status)?;
        Ok(Response::new(reply))
    }

    async fn hook_push(
        &self,
        req: Request<pb::HookPushRequest>,
    ) -> Result<Response<pb::HookPushReply>, Status> {
        self.refuse_if_paused()?;
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        if r.updates.is_empty() || r.updates.len() > MAX_PUSH_REFS {
            return Err(Status::invalid_argument(format!(
                "a push carries 1 to {MAX_PUSH_REFS} ref updates, not {}",
                r.updates.len()
            )));
        }
        if r.git_moves_refs && r.updates.len() != 1 {
            return Err(Status::invalid_argument(
                "the update hook reports exactly one ref",
            ));
        }
        let mut seen = BTreeSet::new();
        let mut updates = Vec::with_capacity(r.updates.len());
        for u in r.updates {
            validate::ref_name(&u.ref_name).map_err(invalid)?;
            validate::object_id(&u.old).map_err(invalid)?;
            validate::object_id(&u.new).map_err(invalid)?;
            if !seen.insert(u.ref_name.clone()) {
                return Err(Status::invalid_argument(format!(
                    "{} appears twice in one push",
                    u.ref_name
                )));
            }
            updates.push(Proposed {
                ref_name: u.ref_name,
                old: opt(&u.old),
                new: opt(&u.new),
            });
        }
        let (path, group) = self.hook_group(&caller, &r.repo_path).await?;
        let creates = updates
            .iter()
            .filter(|u| u.old.is_none() && u.new.is_some())
            .count() as u64;
        self.refuse_beyond_ref_quota(&group, creates)?;
        let names: Vec<String> = updates.iter().map(|u| u.ref_name.clone()).collect();
        let (git_moves_refs, atomic) = (r.git_moves_refs, r.atomic);
        // Detached: a hook that dies (or times out) mid-call must not cut the
        // push in half; once the consensus decided, the replica follows.
        let pushes = self.pushes.clone();
        let task = tokio::spawn(async move {
            match (git_moves_refs, <[Proposed; 1]>::try_from(updates)) {
                (true, Ok([update])) => vec![pushes.update_hook(&group, &path, update).await],
                (_, Ok(one)) => pushes.push(&group, &path, one.into(), atomic).await,
                (_, Err(all)) => pushes.push(&group, &path, all, atomic).await,
            }
        });
        let verdicts = task
            .await
            .map_err(|e| Status::internal(format!("push task failed: {e}")))?;
        Ok(Response::new(pb::HookPushReply {
            verdicts: verdicts
                .into_iter()
                .zip(names)
                .map(|(v, ref_name)| match v {
                    Verdict::Accept => pb::RefVerdict {
                        ref_name,
                        accepted: true,
                        message: String::new(),
                    },
                    Verdict::Reject(message) => pb::RefVerdict {
                        ref_name,
                        accepted: false,
                        message,
                    },
                })
                .collect(),
        }))
    }

    async fn export_consensus(
        &self,
        req: Request<pb::ExportRequest>,
    ) -> Result<Response<pb::ConsensusExport>, Status> {
        self.access.require_admin(&req, "exporting the consensus")?;
        let groups = self.consensus.groups();
        // One linearizable read brings this node's state up to now; with
        // pushes paused nothing moves after it.
        if let Some(first) = groups.first() {
            self.consensus
                .group(first, true)
                .await
                .map_err(consensus_status)?;
        }
        let mut out = pb::ConsensusExport::default();
        for name in self.consensus.groups() {
            let view = self
                .consensus
                .local_group(&name)
                .map_err(consensus_status)?;
            out.groups.push(view.into_group_state(name));
        }
        Ok(Response::new(out))
    }

    async fn import_consensus(
        &self,
        req: Request<pb::ConsensusExport>,
    ) -> Result<Response<pb::ImportReply>, Status> {
        self.access.require_admin(&req, "importing a consensus")?;
        let export = req.into_inner();
        // Everything is checked before anything is written.
        let mut seen = BTreeSet::new();
        for g in &export.groups {
            validate::group_name(&g.name).map_err(invalid)?;
            if !seen.insert(g.name.clone()) {
                return Err(Status::invalid_argument(format!(
                    "group {} appears twice in the import",
                    g.name
                )));
            }
            for r in &g.refs {
                check_ref(&g.name, &r.ref_name, &[&r.value])?;
                if r.value.is_empty() {
                    return Err(Status::invalid_argument(format!(
                        "{} {} has no value",
                        g.name, r.ref_name
                    )));
                }
            }
            for r in &g.replicas {
                if r.node_id == 0 || validate::repo_path(&r.path).is_err() {
                    return Err(Status::invalid_argument(format!(
                        "group {}: replica {:?} on node {} is not an absolute path on a member",
                        g.name, r.path, r.node_id
                    )));
                }
            }
        }
        // Into an empty consensus only: merging two histories is clobber's
        // job, not an import's.
        if let Some(g) = self.consensus.groups().first() {
            self.consensus
                .group(g, true)
                .await
                .map_err(consensus_status)?;
        }
        if let Some(existing) = self.consensus.groups().first() {
            return Err(Status::failed_precondition(format!(
                "the consensus already holds group {existing}: import needs an empty one \
                 (a fresh data dir for the embedded Raft, a fresh --etcd-prefix for etcd)"
            )));
        }
        let mut refs = 0;
        for g in &export.groups {
            let view = self
                .consensus
                .group(&g.name, true)
                .await
                .map_err(consensus_status)?;
            let values: BTreeMap<String, String> = g
                .refs
                .iter()
                .map(|r| (r.ref_name.clone(), r.value.clone()))
                .collect();
            refs += values.len() as u64;
            // Refs first: a replica registered before its group's refs
            // would see an empty group and follow it.
            self.consensus
                .clobber(&g.name, values, view.version)
                .await
                .map_err(consensus_status)?;
            for r in &g.replicas {
                self.consensus
                    .register(&g.name, r.node_id, &r.path)
                    .await
                    .map_err(consensus_status)?;
            }
        }
        tracing::info!(groups = export.groups.len(), refs, "consensus imported");
        Ok(Response::new(pb::ImportReply {
            groups: export.groups.len() as u64,
            refs,
        }))
    }

    async fn hook_post_update(
        &self,
        req: Request<pb::HookPostUpdateRequest>,
    ) -> Result<Response<pb::HookPostUpdateReply>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let (_, group) = self.hook_group(&caller, &r.repo_path).await?;
        // git has moved these refs: the holds whose values landed end at the
        // replicator's next look, which this asks for now.
        self.replicator.nudge(&group);
        Ok(Response::new(pb::HookPostUpdateReply {}))
    }
}
