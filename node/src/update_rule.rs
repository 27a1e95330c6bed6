//! The update rule (SPEC §3) for a whole push: every ref update of one
//! `git push` is decided together, in one consensus step per round.
//!
//! 1. consensus == new: accept (replication of an agreed value, or a retry).
//! 2. CAS(old -> new) succeeds: accept.
//! 3. consensus moved to C, `new` descends from C and is here: CAS(C -> new).
//! 4. otherwise reject with "pull and push again" (the caller then pulls
//!    this replica towards C).
//!
//! Rules 1 and 2 are one compare-and-swap: the state machine counts a ref
//! already at `new` as success. Rule 3 costs a second round for the refs
//! that need it. An atomic push moves every ref or none, in every round.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use piehole_repo::Replica;

use crate::consensus::{Consensus, ConsensusError, RefUpdate};

/// One ref of a push as git reported it. `None` is "absent".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposed {
    pub ref_name: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Reject(String),
}

/// How many times rule 3 may chase consensus values that keep moving.
const MAX_ROUNDS: usize = 3;
/// A round is started only with at least this long before the deadline.
const MIN_ROUND: Duration = Duration::from_millis(500);

/// Rules 1-3 for every update of one push; one verdict per update, in
/// order. Every consensus round fails by `deadline`. A round that fails
/// (no quorum, timed out) refuses the refs still undecided with its reason;
/// refs an earlier round decided keep their verdicts.
pub async fn decide(
    consensus: &dyn Consensus,
    group: &str,
    repo_path: &Path,
    updates: &[Proposed],
    atomic: bool,
    deadline: Instant,
) -> Vec<Verdict> {
    let mut expected: Vec<Option<String>> = updates.iter().map(|u| u.old.clone()).collect();
    let mut verdicts: Vec<Option<Verdict>> = vec![None; updates.len()];
    let mut group_has: Vec<Option<String>> = vec![None; updates.len()];
    for _ in 0..MAX_ROUNDS {
        let pending: Vec<usize> = (0..updates.len())
            .filter(|&i| verdicts[i].is_none())
            .collect();
        if pending.is_empty() {
            break;
        }
        if Instant::now() + MIN_ROUND > deadline {
            // Not another round that could only end "may still take effect".
            for &i in &pending {
                verdicts[i] = Some(Verdict::Reject(format!(
                    "{}: {}",
                    updates[i].ref_name,
                    ConsensusError::OutOfTime
                )));
            }
            break;
        }
        let batch = pending
            .iter()
            .map(|&i| RefUpdate {
                ref_name: updates[i].ref_name.clone(),
                expected: expected[i].clone(),
                new: updates[i].new.clone(),
            })
            .collect();
        let outcomes = match consensus.update_refs(group, batch, atomic, deadline).await {
            Ok(o) => o,
            Err(e) => {
                for &i in &pending {
                    verdicts[i] = Some(Verdict::Reject(format!("{}: {e}", updates[i].ref_name)));
                }
                break;
            }
        };
        // Refs the group has moved past what we expected: rule 3 candidates.
        let mut moved = Vec::new();
        for (&i, out) in pending.iter().zip(outcomes) {
            if out.applied {
                verdicts[i] = Some(Verdict::Accept);
            } else if let Some(other) = out.blocked_by {
                verdicts[i] = Some(Verdict::Reject(format!(
                    "{}: cannot be created while {other} exists (a ref cannot also be a directory of refs)",
                    updates[i].ref_name
                )));
            } else if out.current == updates[i].new {
                // Already where this push wants it (an atomic round that
                // failed on another ref reports it unapplied): done next round.
                expected[i] = out.current;
            } else if out.current != expected[i] {
                group_has[i] = out.current.clone();
                moved.push((i, out.current));
            }
            // else: an atomic round that failed on another ref; try again.
        }
        let checks: Vec<(usize, Option<String>, Option<String>)> = moved
            .into_iter()
            .map(|(i, current)| (i, updates[i].new.clone(), current))
            .collect();
        for (i, current, descends) in descends_from(repo_path, checks).await {
            if descends {
                expected[i] = current;
            } else {
                verdicts[i] = Some(reject(&updates[i].ref_name, current.as_deref()));
            }
        }
        if atomic
            && verdicts
                .iter()
                .any(|v| matches!(v, Some(Verdict::Reject(_))))
        {
            break;
        }
    }
    let rejected_atomic = atomic && verdicts.iter().any(|v| !matches!(v, Some(Verdict::Accept)));
    verdicts
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Some(Verdict::Accept) if !rejected_atomic => Verdict::Accept,
            Some(Verdict::Reject(m)) => Verdict::Reject(m),
            _ if rejected_atomic => atomic_casualty(&updates[i].ref_name),
            _ => reject(&updates[i].ref_name, group_has[i].as_deref()),
        })
        .collect()
}

/// A ref of an atomic push refused only because another one was.
pub fn atomic_casualty(ref_name: &str) -> Verdict {
    Verdict::Reject(format!(
        "{ref_name}: not changed, because another ref of this atomic push was refused"
    ))
}

/// Rule 4's message. The value is shown short, cut by characters so that no
/// value can make it panic.
pub fn reject(ref_name: &str, group_has: Option<&str>) -> Verdict {
    let agreed = match group_has {
        Some(c) => format!("the group has {}", c.chars().take(12).collect::<String>()),
        None => "the group has deleted it".to_string(),
    };
    Verdict::Reject(format!(
        "{ref_name}: this replica is catching up ({agreed}); pull and push again"
    ))
}

/// For each (index, new, current): whether `new` descends from `current`
/// with both here (rule 3). Deletions and absent values never do.
async fn descends_from(
    repo_path: &Path,
    checks: Vec<(usize, Option<String>, Option<String>)>,
) -> Vec<(usize, Option<String>, bool)> {
    if checks.is_empty() {
        return Vec::new();
    }
    let path = repo_path.to_path_buf();
    let fallback: Vec<_> = checks
        .iter()
        .map(|(i, _, c)| (*i, c.clone(), false))
        .collect();
    blocking(move || {
        let repo = Replica::open(&path)?;
        Ok(checks
            .into_iter()
            .map(|(i, new, current)| {
                let descends = match (&new, &current) {
                    (Some(n), Some(c)) => repo.is_descendant(n, c),
                    _ => false,
                };
                (i, current, descends)
            })
            .collect())
    })
    .await
    .unwrap_or(fallback)
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
