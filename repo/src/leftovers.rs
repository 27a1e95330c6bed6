//! What a killed process leaves in a repository.
//!
//! - Lock files: git and libgit2 take a ref's lock by creating `<ref>.lock`
//!   and drop it by renaming or removing it; a process killed in between
//!   leaves the file, and from then on every update of that ref fails
//!   ("locked") until someone removes it. git leaves that to a human; a node
//!   that was SIGKILLed while moving a ref cannot wait for one, so a lock
//!   that no living writer can hold is removed.
//! - Temporary packs: libgit2 streams a pack into
//!   `objects/pack/pack_git2_<random>` and renames it when complete; a node
//!   killed mid-transfer leaves the partial file, which not even `git gc`
//!   removes. Only the node that hosts the replica writes packs with
//!   libgit2 there, so the ones present before its first write are dead.

use std::path::Path;

use crate::RepoError;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// No ref transaction holds a ref's lock this long.
const STALE_AFTER: Duration = Duration::from_secs(60);
/// A ref's lock older than this process and at least this old is a dead
/// predecessor's: writers hold ref locks for milliseconds.
const STALE_FROM_BEFORE_START: Duration = Duration::from_secs(1);
/// `git pack-refs` and gc hold packed-refs.lock while they rewrite a file
/// that can be large: only a lock this old is taken for dead.
const PACKED_REFS_STALE_AFTER: Duration = Duration::from_secs(600);

static STARTED: OnceLock<SystemTime> = OnceLock::new();

/// Notes when this process began using repositories.
pub(crate) fn note_start() {
    STARTED.get_or_init(SystemTime::now);
}

/// `objects` and `objects/pack` are directories of the repository's own,
/// not symlinks someone who can write the repository put there: packs are
/// written and partial ones removed with this process's rights.
pub(crate) fn pack_dir_here(git_dir: &Path) -> Result<(), RepoError> {
    let objects = git_dir.join("objects");
    for dir in [objects.clone(), objects.join("pack")] {
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_dir() => {}
            // Created by libgit2 when needed, not followed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            _ => return Err(RepoError::PacksElsewhere(dir)),
        }
    }
    Ok(())
}

/// Removes every partial pack in `git_dir`; returns how many. Only for a
/// process that has not written a pack there yet: then they are all dead.
pub(crate) fn clear_dead_temporary_packs(git_dir: &Path) -> usize {
    if pack_dir_here(git_dir).is_err() {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(git_dir.join("objects").join("pack")) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let partial = entry
            .file_name()
            .to_string_lossy()
            .starts_with("pack_git2_");
        if partial && std::fs::remove_file(entry.path()).is_ok() {
            tracing::warn!(file = %entry.path().display(), "removed a partial pack a killed process left");
            removed += 1;
        }
    }
    removed
}

/// When `lock` counts as stale: None if there is no such file.
pub(crate) fn stale_at(lock: &Path) -> Option<SystemTime> {
    // The lock's own time, not that of what a planted symlink points at.
    let modified = std::fs::symlink_metadata(lock)
        .and_then(|m| m.modified())
        .ok()?;
    let packed_refs = lock.file_name().is_some_and(|n| n == "packed-refs.lock");
    let before_start = STARTED.get().is_some_and(|s| modified < *s);
    Some(if packed_refs {
        modified + PACKED_REFS_STALE_AFTER
    } else if before_start {
        modified + STALE_FROM_BEFORE_START
    } else {
        modified + STALE_AFTER
    })
}

/// Removes `lock` if it is stale; true if it was (and is now gone).
pub(crate) fn clear_if_stale(lock: &Path) -> bool {
    let Some(stale_at) = stale_at(lock) else {
        return false;
    };
    if SystemTime::now() < stale_at {
        return false;
    }
    match std::fs::remove_file(lock) {
        Ok(()) => {
            tracing::warn!(lock = %lock.display(), "removed a stale lock file left by a killed process");
            true
        }
        Err(e) => {
            tracing::warn!(lock = %lock.display(), error = %e, "cannot remove a stale lock file");
            false
        }
    }
}
