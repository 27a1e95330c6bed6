//! The one place that moves this node's replicas' refs. (On the update-hook
//! path of old git, git moves an accepted ref itself; [`Holds`] keep this
//! module's hands off it meanwhile.)
//!
//! Invariant (SPEC §3, monotonic replicas): a local ref is only ever set to
//! the value the consensus holds for it at that moment, read under the
//! group's lock from state that has been fully replayed. Applied state only
//! moves forward along the log, so a replica only moves forward along the
//! consensus history — whatever crashes, restarts, replays or concurrent
//! pushes happen — and two writers of one group never interleave.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use piehole_repo::confine::Writer;
use piehole_repo::{Replica, RepoError};

use crate::consensus::Consensus;

/// How long a ref accepted by the update hook is left to git, which moves it
/// right after the hook answers. A hook or git that dies in between leaves
/// the ref to the replicator after this long.
const HOLD_FOR: Duration = Duration::from_secs(5);

/// Which refs of a group a pass looks at.
#[derive(Debug, Clone)]
pub enum Scope {
    All,
    Only(BTreeSet<String>),
}

/// What a pass left behind.
#[derive(Debug, Default)]
pub struct Synced {
    /// The consensus refs the pass compared with (name -> value).
    pub consensus: BTreeMap<String, String>,
    /// The local refs after the pass, for the names it looked at.
    pub local: BTreeMap<String, String>,
    /// Consensus values whose objects are not all here: name -> value.
    pub missing: BTreeMap<String, String>,
    /// The earliest moment a ref left alone (for a push in flight, or
    /// behind another writer's lock) may be free: look again then.
    pub held_until: Option<Instant>,
}

pub struct LocalRefs {
    consensus: Arc<dyn Consensus>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    holds: Holds,
}

impl LocalRefs {
    pub fn new(consensus: Arc<dyn Consensus>) -> Arc<LocalRefs> {
        Arc::new(LocalRefs {
            consensus,
            locks: Mutex::default(),
            holds: Holds::default(),
        })
    }

    pub fn holds(&self) -> &Holds {
        &self.holds
    }

    fn lock_of(&self, group: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(group.to_string()).or_default().clone()
    }

    /// Moves every ref in `scope` whose consensus value is complete here to
    /// that value (deleting refs the consensus lacks), keeping any tip a move
    /// would lose under `refs/piehole/displaced/`.
    /// `complete` are values known to be complete here already (git checked
    /// a push's objects before running the hook), whose history need not be
    /// walked again.
    pub async fn sync(
        &self,
        group: &str,
        path: &Path,
        scope: Scope,
        complete: BTreeSet<String>,
        message: &'static str,
    ) -> Result<Synced, RepoError> {
        self.consensus.wait_replayed().await;
        let lock = self.lock_of(group);
        let _writer = lock.lock().await;
        let pass = Pass {
            consensus: self.consensus.clone(),
            holds: self.holds.clone(),
            group: group.to_string(),
            path: path.to_path_buf(),
            complete,
            message,
        };
        crate::update_rule::blocking(move || pass.run(scope)).await
    }
}

impl LocalRefs {
    /// Runs `f` (git work) while no pass moves the group's refs: a
    /// consistent read of a replica (clobber's).
    pub async fn read<T: Send + 'static>(
        &self,
        group: &str,
        f: impl FnOnce() -> Result<T, RepoError> + Send + 'static,
    ) -> Result<T, RepoError> {
        let lock = self.lock_of(group);
        let _writer = lock.lock().await;
        crate::update_rule::blocking(f).await
    }
}

struct Pass {
    consensus: Arc<dyn Consensus>,
    holds: Holds,
    group: String,
    path: PathBuf,
    complete: BTreeSet<String>,
    message: &'static str,
}

impl Pass {
    fn run(self, scope: Scope) -> Result<Synced, RepoError> {
        let repo = Replica::open(&self.path)?;
        // The moves run on a thread confined to the repository; this one
        // reads the consensus (the database) between them.
        let mut writer = Writer::new(&self.path, Replica::open);
        // One connectivity check for the whole pass, made when first needed:
        // what it learns about the repository's refs is learned once.
        let mut checker = None;
        let view = self
            .consensus
            .local_group(&self.group)
            .map_err(|e| RepoError::Io {
                path: self.path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let mut out = Synced {
            consensus: view.refs.into_iter().map(|(k, v)| (k, v.value)).collect(),
            ..Synced::default()
        };
        let names: BTreeSet<String> = match scope {
            Scope::All => {
                out.local = repo.refs()?;
                out.consensus
                    .keys()
                    .chain(out.local.keys())
                    .cloned()
                    .collect()
            }
            Scope::Only(names) => {
                for name in &names {
                    if let Some(v) = repo.ref_value(name)? {
                        out.local.insert(name.clone(), v);
                    }
                }
                names
            }
        };
        // Deletions first: refs/heads/a can only appear once refs/heads/a/b
        // is gone (a name cannot be a file and a directory at once).
        let (deletions, others): (Vec<String>, Vec<String>) = names
            .into_iter()
            .partition(|n| self.consensus.local_value(&self.group, n).is_none());
        for name in deletions.into_iter().chain(others) {
            // The freshest value, not the one the listing above saw.
            let want = self.consensus.local_value(&self.group, &name);
            let have = out.local.get(&name).cloned();
            if want == have {
                continue;
            }
            if let Some(until) = self.holds.blocks(&self.group, &name, have.as_deref()) {
                out.held_until = Some(out.held_until.map_or(until, |u| u.min(until)));
                continue;
            }
            if let Some(w) = &want {
                let known = self.complete.contains(w);
                if !known {
                    if checker.is_none() {
                        checker = Some(repo.completeness()?);
                    }
                    if let Some(c) = checker.as_mut() {
                        if !c.is_complete(w)? {
                            out.missing.insert(name, w.clone());
                            continue;
                        }
                    }
                }
            }
            let (n, h, w, message) = (name.clone(), have.clone(), want.clone(), self.message);
            let moved = writer
                .call(move |r: &Replica| {
                    r.set_ref_keeping_old(&n, h.as_deref(), w.as_deref(), message)
                })
                .and_then(|moved| moved);
            match moved {
                Ok(()) => match want {
                    Some(w) => {
                        out.local.insert(name, w);
                    }
                    None => {
                        out.local.remove(&name);
                    }
                },
                // A lock a killed predecessor left counts as stale soon:
                // look again then, not at the next periodic pass.
                Err(RepoError::RefLocked { stale_at, .. }) => {
                    let wait = stale_at
                        .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
                        .unwrap_or(Duration::from_secs(1));
                    let at = Instant::now() + wait;
                    out.held_until = Some(out.held_until.map_or(at, |u| u.min(at)));
                }
                // Moved under us (git on the update-hook path, an operator):
                // the next pass looks again.
                Err(RepoError::RefMoved { current, .. }) => {
                    tracing::debug!(ref_name = %name, ?current, "local ref moved meanwhile");
                    match current {
                        Some(c) => out.local.insert(name, c),
                        None => out.local.remove(&name),
                    };
                }
                // Said again every pass until someone acts, and often for
                // every ref at once (a symlinked logs/): a line a minute
                // per group, the rest counted.
                Err(e) => {
                    if NOT_MOVED.allow(&self.group) {
                        tracing::warn!(group = %self.group, ref_name = %name, error = %e, "local ref not moved");
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Refs a pass could not move, logged per group.
static NOT_MOVED: std::sync::LazyLock<crate::access::RefusalLog> =
    std::sync::LazyLock::new(|| crate::access::RefusalLog::every(Duration::from_secs(60)));

struct Hold {
    token: u64,
    /// What git will set the ref to.
    new: Option<String>,
    until: Instant,
}

/// Refs the update hook accepted and git has yet to move. Each accepted
/// push holds its ref under its own token and deadline; a hold ends when
/// its push's value lands, when it is released, or at its deadline, so a
/// hook or git that dies in between delays the ref by seconds at most.
#[derive(Clone, Default)]
pub struct Holds {
    held: Arc<Mutex<HoldMap>>,
    next_token: Arc<AtomicU64>,
}

/// (group, ref name) -> the pushes holding it.
type HoldMap = HashMap<(String, String), Vec<Hold>>;

impl Holds {
    fn map(&self) -> std::sync::MutexGuard<'_, HoldMap> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds `ref_name` for a push whose decision may take up to
    /// `deciding`; once it is accepted, [`Holds::accepted`] starts the
    /// short clock within which git moves the ref.
    pub fn hold(&self, group: &str, ref_name: &str, new: Option<&str>, deciding: Duration) -> u64 {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let mut map = self.map();
        // Holds of refs nobody looked at since they ended go here.
        let now = Instant::now();
        map.retain(|_, holds| {
            holds.retain(|h| h.until > now);
            !holds.is_empty()
        });
        map.entry((group.to_string(), ref_name.to_string()))
            .or_default()
            .push(Hold {
                token,
                new: new.map(String::from),
                until: now + deciding + HOLD_FOR,
            });
        token
    }

    /// The push was accepted just now: git moves the ref next, and the hold
    /// lasts HOLD_FOR from here. (Put back if something dropped it
    /// meanwhile: its value could have landed early, through the
    /// replicator, and git's own update must still find the ref untouched.)
    pub fn accepted(&self, group: &str, ref_name: &str, token: u64, new: Option<&str>) {
        let until = Instant::now() + HOLD_FOR;
        let mut map = self.map();
        let holds = map
            .entry((group.to_string(), ref_name.to_string()))
            .or_default();
        match holds.iter_mut().find(|h| h.token == token) {
            Some(h) => h.until = until,
            None => holds.push(Hold {
                token,
                new: new.map(String::from),
                until,
            }),
        }
    }

    pub fn release(&self, group: &str, ref_name: &str, token: u64) {
        let key = (group.to_string(), ref_name.to_string());
        let mut map = self.map();
        if let Some(holds) = map.get_mut(&key) {
            holds.retain(|h| h.token != token);
            if holds.is_empty() {
                map.remove(&key);
            }
        }
    }

    /// Whether a push still has `ref_name` in flight, given its local value
    /// now; if so, until when at most. Holds whose value has landed or whose
    /// deadline passed are dropped first.
    fn blocks(&self, group: &str, ref_name: &str, local: Option<&str>) -> Option<Instant> {
        let key = (group.to_string(), ref_name.to_string());
        let mut map = self.map();
        let holds = map.get_mut(&key)?;
        let now = Instant::now();
        holds.retain(|h| h.until > now && h.new.as_deref() != local);
        let until = holds.iter().map(|h| h.until).min();
        if holds.is_empty() {
            map.remove(&key);
        }
        until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn a_hold_ends_when_its_value_lands_or_is_released() {
        let holds = Holds::default();
        let t1 = holds.hold("g", "refs/heads/m", Some(A), Duration::ZERO);
        let t2 = holds.hold("g", "refs/heads/m", Some(B), Duration::ZERO);
        assert!(holds.blocks("g", "refs/heads/m", None).is_some());
        // git moved the ref to A: the first push is done, the second is not.
        assert!(holds.blocks("g", "refs/heads/m", Some(A)).is_some());
        holds.release("g", "refs/heads/m", t2);
        assert!(holds.blocks("g", "refs/heads/m", Some(A)).is_none());
        holds.release("g", "refs/heads/m", t1); // already gone: harmless
        assert!(holds.map().is_empty());
    }

    #[test]
    fn a_hold_never_outlives_its_deadline() {
        let holds = Holds::default();
        let t = holds.hold("g", "refs/heads/m", Some(A), Duration::from_secs(10));
        let until = holds.blocks("g", "refs/heads/m", None).unwrap();
        assert!(until <= Instant::now() + Duration::from_secs(10) + HOLD_FOR);
        // Later pushes of the same ref do not extend an earlier hold.
        holds.hold("g", "refs/heads/m", Some(B), Duration::from_secs(10));
        assert_eq!(holds.blocks("g", "refs/heads/m", None), Some(until));
        // Accepted: HOLD_FOR from now, whatever deciding was allowed.
        holds.accepted("g", "refs/heads/m", t, Some(A));
        let after = holds.blocks("g", "refs/heads/m", None).unwrap();
        assert!(after <= Instant::now() + HOLD_FOR);
    }
}
