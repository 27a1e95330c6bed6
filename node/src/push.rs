//! One push, from what git reported to the verdicts git shows: the
//! operator's receive.* policy, durability, the update rule, then the local
//! refs. Run detached from the hook's call, so a hook killed midway cannot
//! cut a push in half: once the consensus decided, the replica follows.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use piehole_repo::Replica;

use crate::consensus::Consensus;
use crate::durability::ObjectQuorum;
use crate::local_refs::{LocalRefs, Scope};
use crate::replicator::Replicator;
use crate::update_rule::{self, blocking, Proposed, Verdict};

/// git's own reflog message for a pushed ref.
const REFLOG_PUSH: &str = "push";
/// How long a decided push waits for its replica's refs to move before it
/// answers anyway (the hook's margin beyond the request timeout is 3 s).
const FOLLOW_BOUND: Duration = Duration::from_secs(2);

pub struct Pushes {
    pub consensus: Arc<dyn Consensus>,
    pub local_refs: Arc<LocalRefs>,
    pub replicator: Arc<Replicator>,
    pub quorum: ObjectQuorum,
}

impl Pushes {
    /// Every ref of one push (proc-receive): decided in one consensus step
    /// (per ref, or all or nothing when `atomic`), then the node moves the
    /// replica's refs itself. The decision takes at most the request
    /// timeout, so the hook, which waits that long and a margin more, hears
    /// the node's own answer.
    pub async fn push(
        &self,
        group: &str,
        path: &Path,
        updates: Vec<Proposed>,
        atomic: bool,
    ) -> Vec<Verdict> {
        let start = Instant::now();
        let timeout = self.consensus.request_timeout();
        let mut verdicts = policy(path, &updates).await;
        if atomic && verdicts.iter().any(|v| v.is_some()) {
            return updates
                .iter()
                .zip(verdicts)
                .map(|(u, v)| v.unwrap_or_else(|| update_rule::atomic_casualty(&u.ref_name)))
                .collect();
        }
        let allowed: Vec<usize> = (0..updates.len())
            .filter(|&i| verdicts[i].is_none())
            .collect();
        let to_decide: Vec<Proposed> = allowed.iter().map(|&i| updates[i].clone()).collect();
        let decided = match self
            .store_objects(group, &to_decide, start + timeout / 2)
            .await
        {
            Ok(()) => {
                let deadline = start + timeout;
                update_rule::decide(
                    self.consensus.as_ref(),
                    group,
                    path,
                    &to_decide,
                    atomic,
                    deadline,
                )
                .await
            }
            Err(why) => to_decide
                .iter()
                .map(|u| Verdict::Reject(format!("{}: {why}; nothing was changed", u.ref_name)))
                .collect(),
        };
        for (i, v) in allowed.into_iter().zip(decided) {
            verdicts[i] = Some(v);
        }
        // Accepted refs move to the group's value (this push's, or a newer
        // one); refused ones are pulled towards the group's (rule 4). git
        // checked the pushed objects are all here before running the hook.
        let names = updates.iter().map(|u| u.ref_name.clone()).collect();
        let pushed = updates.iter().filter_map(|u| u.new.clone()).collect();
        self.follow(group, path, Scope::Only(names), pushed, REFLOG_PUSH)
            .await;
        verdicts
            .into_iter()
            .map(|v| v.unwrap_or(Verdict::Accept))
            .collect()
    }

    /// One ref from the update hook of git older than 2.29: git moves the
    /// ref itself after we accept, so it is held for git, not moved.
    pub async fn update_hook(&self, group: &str, path: &Path, update: Proposed) -> Verdict {
        if let Some(Some(refused)) = policy(path, std::slice::from_ref(&update)).await.pop() {
            return refused;
        }
        let start = Instant::now();
        let timeout = self.consensus.request_timeout();
        let holds = self.local_refs.holds();
        let token = holds.hold(group, &update.ref_name, update.new.as_deref(), timeout);
        // git moves the ref only if it still holds `old`; if something moved
        // it since git read it, accepting would fail git's update anyway.
        let (p, name) = (path.to_path_buf(), update.ref_name.clone());
        let local = blocking(move || Replica::open(&p)?.ref_value(&name)).await;
        let verdict = if local.as_ref().ok() != Some(&update.old) {
            let current = self.consensus.local_value(group, &update.ref_name);
            update_rule::reject(&update.ref_name, current.as_deref())
        } else {
            let one = std::slice::from_ref(&update);
            match self.store_objects(group, one, start + timeout / 2).await {
                Err(why) => {
                    Verdict::Reject(format!("{}: {why}; nothing was changed", update.ref_name))
                }
                Ok(()) => update_rule::decide(
                    self.consensus.as_ref(),
                    group,
                    path,
                    one,
                    false,
                    start + timeout,
                )
                .await
                .pop()
                .unwrap_or(Verdict::Accept),
            }
        };
        if verdict == Verdict::Accept {
            // git moves the ref right after this answer: its deadline runs from now.
            holds.accepted(group, &update.ref_name, token, update.new.as_deref());
        } else {
            holds.release(group, &update.ref_name, token);
            let names = BTreeSet::from([update.ref_name.clone()]);
            self.follow(
                group,
                path,
                Scope::Only(names),
                BTreeSet::new(),
                "piehole: catch up with the group",
            )
            .await;
        }
        verdict
    }

    /// --durability quorum: the new values' objects on a majority first.
    async fn store_objects(
        &self,
        group: &str,
        updates: &[Proposed],
        by: Instant,
    ) -> Result<(), String> {
        let wants: Vec<String> = updates
            .iter()
            .filter_map(|u| u.new.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        self.quorum.store(group, wants, by).await
    }

    /// Moves the replica's refs in `scope` to the group's values; asks the
    /// replicator for whatever objects are missing. `complete` are values
    /// known to be complete here (no need to walk their history).
    ///
    /// Waits FOLLOW_BOUND at most: the consensus has decided, and a push of
    /// thousands of refs (each written and fsynced) must not outlast the
    /// hook's patience and be reported failed; the rest carries on alone.
    async fn follow(
        &self,
        group: &str,
        path: &Path,
        scope: Scope,
        complete: BTreeSet<String>,
        message: &'static str,
    ) {
        let (local_refs, replicator) = (self.local_refs.clone(), self.replicator.clone());
        let (g, p) = (group.to_string(), path.to_path_buf());
        // A task, not a future under a timeout: dropping the future would
        // drop the group's lock while its blocking pass still writes.
        let task = tokio::spawn(async move {
            match local_refs.sync(&g, &p, scope, complete, message).await {
                Ok(s) if s.missing.is_empty() => {}
                Ok(_) => replicator.nudge(&g),
                Err(e) => {
                    tracing::warn!(group = %g, error = %e, "could not move the replica's refs; the replicator will");
                    replicator.nudge(&g);
                }
            }
        });
        if tokio::time::timeout(FOLLOW_BOUND, task).await.is_err() {
            tracing::info!(
                group,
                "the replica's refs are still being moved; answering the hook meanwhile"
            );
        }
    }
}

/// The operator's receive.denyDeletes and receive.denyNonFastForwards, which
/// git leaves to the hook for refs a proc-receive hook handles. As in git,
/// they concern branches only.
async fn policy(path: &Path, updates: &[Proposed]) -> Vec<Option<Verdict>> {
    let p = path.to_path_buf();
    let list = updates.to_vec();
    let checked = blocking(move || {
        let repo = Replica::open(&p)?;
        let deny_deletes = repo.config_bool("receive.denyDeletes")?;
        let deny_non_ff = repo.config_bool("receive.denyNonFastForwards")?;
        Ok(list
            .iter()
            .map(|u| match (&u.old, &u.new) {
                _ if !u.ref_name.starts_with("refs/heads/") => None,
                (Some(_), None) if deny_deletes => Some(Verdict::Reject(format!(
                    "{}: deletion prohibited (receive.denyDeletes)",
                    u.ref_name
                ))),
                (Some(old), Some(new)) if deny_non_ff && !repo.is_descendant(new, old) => {
                    Some(Verdict::Reject(format!(
                        "{}: non-fast-forward (receive.denyNonFastForwards)",
                        u.ref_name
                    )))
                }
                _ => None,
            })
            .collect())
    })
    .await;
    checked.unwrap_or_else(|e| {
        updates
            .iter()
            .map(|u| Some(Verdict::Reject(format!("{}: {e}", u.ref_name))))
            .collect()
    })
}
