//! The update rule (SPEC §3), decided in the node so a hook costs one round
//! trip. Git calls `update` once per ref; we answer accept or reject.
//!
//! 1. consensus == new: accept (replication of an agreed value, or a retry).
//! 2. CAS(old -> new) succeeds: accept.
//! 3. consensus moved to C, `new` descends from C and is here: CAS(C -> new).
//! 4. otherwise reject with "pull and push again", after pulling this
//!    replica towards C (locally if C is here, else by asking the replicator).
//!
//! Rule 1 needs no separate read: the CAS in the state machine succeeds when
//! the value already equals `new`.

use std::path::{Path, PathBuf};

use piehole_repo::Replica;

use crate::consensus::{Consensus, ConsensusError};
use crate::replicator::Replicator;

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Accept,
    Reject(String),
}

/// How many times rule 3 may chase a consensus value that keeps moving.
const MAX_ROUNDS: usize = 3;

pub async fn decide(
    consensus: &dyn Consensus,
    replicator: &Replicator,
    group: &str,
    repo_path: &Path,
    ref_name: &str,
    old: Option<String>,
    new: Option<String>,
) -> Result<Decision, ConsensusError> {
    // Git moves the local ref itself once we accept. Held from before the
    // CAS, so the replicator reacting to the commit cannot move it first and
    // make git's own update fail.
    replicator.hold(group, ref_name);
    let verdict = decide_held(consensus, group, repo_path, ref_name, old.clone(), new).await;
    match verdict {
        Ok(None) => {
            restore_expected(repo_path.to_path_buf(), ref_name.to_string(), old).await;
            Ok(Decision::Accept)
        }
        Ok(Some(current)) => {
            replicator.release(group, &[ref_name.to_string()]);
            let path = repo_path.to_path_buf();
            catch_up_locally(replicator, group, path, ref_name, old, current.clone()).await;
            let agreed = match &current {
                Some(c) => format!("the group has {}", &c[..c.len().min(12)]),
                None => "the group has deleted it".to_string(),
            };
            Ok(Decision::Reject(format!(
                "{ref_name}: this replica is catching up ({agreed}); pull and push again"
            )))
        }
        Err(e) => {
            replicator.release(group, &[ref_name.to_string()]);
            Err(e)
        }
    }
}

/// git read `old` when the push began and moves the ref only if it still
/// holds `old`. If the replicator caught this replica up in between (before
/// the hold), git's update would fail although the group accepted the push;
/// putting `old` back lets git's own update land a moment later.
async fn restore_expected(path: PathBuf, ref_name: String, old: Option<String>) {
    let result = blocking(move || {
        let repo = Replica::open(&path)?;
        let current = repo.ref_value(&ref_name)?;
        if current != old {
            tracing::debug!(
                ref_name,
                "restoring the value git expects before it moves the ref"
            );
            repo.set_ref(
                &ref_name,
                current.as_deref(),
                old.as_deref(),
                "piehole: make way for an accepted push",
            )?;
        }
        Ok(())
    })
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not restore the ref value git expects");
    }
}

/// Rules 1-3. `None`: accepted. `Some(current)`: rejected, the group has
/// `current`.
async fn decide_held(
    consensus: &dyn Consensus,
    group: &str,
    repo_path: &Path,
    ref_name: &str,
    old: Option<String>,
    new: Option<String>,
) -> Result<Option<Option<String>>, ConsensusError> {
    let mut expected = old;
    let mut current = None;
    for _ in 0..MAX_ROUNDS {
        let r = consensus
            .cas(group, ref_name, expected.as_deref(), new.as_deref())
            .await?;
        if r.applied {
            return Ok(None);
        }
        current = r.current;
        let (Some(n), Some(c)) = (new.clone(), current.clone()) else {
            break;
        };
        let path = repo_path.to_path_buf();
        let c2 = c.clone();
        let descends = blocking(move || Ok(Replica::open(&path)?.is_descendant(&n, &c2)))
            .await
            .unwrap_or(false);
        if !descends {
            break;
        }
        expected = Some(c);
    }
    Ok(Some(current))
}

/// Rule 4's courtesy: make the next push from this user more likely to work.
async fn catch_up_locally(
    replicator: &Replicator,
    group: &str,
    path: PathBuf,
    ref_name: &str,
    local: Option<String>,
    target: Option<String>,
) {
    // Another push of this ref is in flight here: leave the ref to it.
    if replicator.is_held(group, ref_name) {
        return;
    }
    let name = ref_name.to_string();
    let moved = blocking(move || {
        let repo = Replica::open(&path)?;
        if let Some(t) = &target {
            if !repo.is_complete(t)? {
                return Ok(false);
            }
        }
        repo.set_ref(
            &name,
            local.as_deref(),
            target.as_deref(),
            "piehole: catch up with the group",
        )?;
        Ok(true)
    })
    .await
    .unwrap_or(false);
    if !moved {
        replicator.nudge(group);
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, piehole_repo::RepoError> + Send + 'static,
) -> Result<T, piehole_repo::RepoError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(piehole_repo::RepoError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(format!("git task failed: {e}")),
        }),
    }
}
