//! One bare repository and the ref operations piehole needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use git2::{ErrorCode, Oid, Reference, Repository};

use crate::RepoError;

/// A bare repository that piehole replicates.
///
/// Wraps a `git2::Repository`, so it is `Send` but not `Sync`: share it
/// between threads behind a mutex, or open one per thread (opening is cheap).
pub struct Replica {
    pub(crate) repo: Repository,
    path: PathBuf,
}

impl Replica {
    /// Opens a bare repository; error RepoError::NotBare if it is not bare,
    /// NotARepository if absent.
    pub fn open(path: &Path) -> Result<Replica, RepoError> {
        crate::durable::enable_fsync();
        crate::leftovers::note_start();
        let repo = open_repository(path)?;
        if !repo.is_bare() {
            return Err(RepoError::NotBare(path.to_path_buf()));
        }
        Ok(Replica {
            repo,
            path: path.to_path_buf(),
        })
    }

    /// Removes what a killed predecessor of this process left here: partial
    /// packs of transfers it never finished. Returns how many. Call it
    /// before this process writes its first pack here, never after: a
    /// partial pack of its own would go too.
    pub fn clear_leftovers(&self) -> usize {
        crate::leftovers::clear_dead_temporary_packs(self.repo.path())
    }

    /// A boolean from the repository's git config (all levels, as git reads
    /// them); false when unset.
    pub fn config_bool(&self, key: &str) -> Result<bool, RepoError> {
        match self.repo.config()?.get_bool(key) {
            Ok(v) => Ok(v),
            Err(e) if e.code() == ErrorCode::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The path the replica was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All direct (non-symbolic) refs under `refs/` except `refs/remotes/`,
    /// name -> target id. Annotated tags give the tag object id, not peeled.
    pub fn refs(&self) -> Result<BTreeMap<String, String>, RepoError> {
        self.packed_refs_readable("refs/*")?;
        let mut out = BTreeMap::new();
        for reference in self.repo.references()? {
            let reference = reference?;
            // Names that are not UTF-8 cannot cross this API; git never makes them itself.
            let (Some(name), Some(target)) = (reference.name(), reference.target()) else {
                continue;
            };
            if is_replicated(name) {
                out.insert(name.to_string(), target.to_string());
            }
        }
        Ok(out)
    }

    /// The id a ref points at, or `None` if it does not exist. A symbolic ref
    /// is followed to the id it finally resolves to.
    pub fn ref_value(&self, name: &str) -> Result<Option<String>, RepoError> {
        check_ref_name(name)?;
        self.packed_refs_readable(name)?;
        Ok(self.lookup(name)?.map(|oid| oid.to_string()))
    }

    /// Object present in the object database.
    pub fn has_object(&self, id: &str) -> bool {
        let Ok(oid) = parse_id(id) else {
            return false;
        };
        self.repo.odb().map(|odb| odb.exists(oid)).unwrap_or(false)
    }

    /// `descendant` (peeled to a commit) has `ancestor` (peeled to a commit) in
    /// its history, or they are equal. False if either is missing or not a
    /// commit-ish.
    pub fn is_descendant(&self, descendant: &str, ancestor: &str) -> bool {
        let (Some(d), Some(a)) = (self.peel_commit(descendant), self.peel_commit(ancestor)) else {
            return false;
        };
        d == a || self.repo.graph_descendant_of(d, a).unwrap_or(false)
    }

    /// Compare-and-swap on a local ref: only if it currently equals `expected`
    /// (None = must not exist) set it to `new` (None = delete).
    ///
    /// The comparison happens inside libgit2 while it holds the ref's lock
    /// file, the same lock `git push` takes, so a concurrent push can never be
    /// clobbered. The reflog entry (with `message`) is written whenever git
    /// itself would write one: `core.logAllRefUpdates` (which `install` turns
    /// on) or an existing reflog for the ref.
    ///
    /// A lock file that a killed process left on the ref (or on
    /// packed-refs) is removed when it is stale, and the update tried again.
    pub fn set_ref(
        &self,
        name: &str,
        expected: Option<&str>,
        new: Option<&str>,
        message: &str,
    ) -> Result<(), RepoError> {
        let locks = [
            self.repo.path().join(format!("{name}.lock")),
            self.repo.path().join("packed-refs.lock"),
        ];
        match self.try_set_ref(name, expected, new, message) {
            Err(RepoError::Git(e)) if e.code() == ErrorCode::Locked => {
                // Both looked at, not just the first that is stale.
                let cleared = locks
                    .iter()
                    .map(|l| crate::leftovers::clear_if_stale(l))
                    .filter(|&c| c)
                    .count();
                match cleared > 0 {
                    true => self.try_set_ref(name, expected, new, message),
                    // The ref's own lock if it has one; else packed-refs'.
                    false => Err(RepoError::RefLocked {
                        name: name.to_string(),
                        stale_at: locks.iter().find_map(|l| crate::leftovers::stale_at(l)),
                    }),
                }
            }
            other => other,
        }
    }

    fn try_set_ref(
        &self,
        name: &str,
        expected: Option<&str>,
        new: Option<&str>,
        message: &str,
    ) -> Result<(), RepoError> {
        check_ref_name(name)?;
        if !name.starts_with("refs/") {
            return Err(RepoError::InvalidRefName(name.to_string()));
        }
        self.refuse_symlinks_on_the_way(name)?;
        let expected = expected.map(parse_id).transpose()?;
        let new = new.map(parse_id).transpose()?;
        if let Some(new) = new {
            if !self.repo.odb()?.exists(new) {
                return Err(RepoError::MissingObject(new.to_string()));
            }
        }
        let result = match (expected, new) {
            (Some(old), Some(new)) => self
                .repo
                .reference_matching(name, new, true, old, message)
                .map(drop),
            (None, Some(new)) => self.repo.reference(name, new, false, message).map(drop),
            (Some(old), None) => return self.delete_ref(name, old),
            (None, None) => {
                return match self.lookup(name)? {
                    None => Ok(()),
                    current => Err(self.moved(name, current)),
                }
            }
        };
        match result {
            Ok(()) => {
                tracing::debug!(name, ?expected, ?new, "local ref updated");
                Ok(())
            }
            Err(e) => Err(self.cas_failure(name, e)?),
        }
    }

    /// [`Replica::set_ref`], keeping the old tip reachable when this move
    /// would lose it: before a ref is deleted or moved to a commit that does
    /// not contain its old value, the old value is written to
    /// `refs/piehole/displaced/<name>`, whose reflog keeps every earlier one.
    pub fn set_ref_keeping_old(
        &self,
        name: &str,
        expected: Option<&str>,
        new: Option<&str>,
        message: &str,
    ) -> Result<(), RepoError> {
        // Before anything is kept of a move that would be refused.
        check_ref_name(name)?;
        self.refuse_symlinks_on_the_way(name)?;
        if let Some(old) = expected {
            // A commit stays reachable from a descendant; any other object
            // (an annotated tag, say) only from itself.
            let old_is_commit = self
                .repo
                .odb()?
                .read_header(parse_id(old)?)
                .is_ok_and(|(_, kind)| kind == git2::ObjectType::Commit);
            let kept = match new {
                None => false,
                Some(new) if new == old => true,
                Some(new) => old_is_commit && self.is_descendant(new, old),
            };
            if !kept {
                self.keep_displaced(name, old, message)?;
            }
        }
        self.set_ref(name, expected, new, message)
    }

    /// Refuses a ref whose file or reflog, the packed refs or HEAD's
    /// reflog (appended to when HEAD's ref moves) would be reached through
    /// a symlink inside the repository, or are not plain files (a FIFO; a
    /// reflog hard-linked elsewhere). Whoever may write `refs/` could point one
    /// into a repository or at a file they may not write, and the node
    /// writes, appends to and deletes with its own rights. A few lstat
    /// calls per ref written, none per ref read.
    ///
    /// Not closed: a swap between this check and libgit2's write. The way
    /// to close it is to write with the pushers' rights, not the node's.
    fn refuse_symlinks_on_the_way(&self, name: &str) -> Result<(), RepoError> {
        let reflog = format!("logs/{name}");
        for relative in [name, reflog.as_str(), "packed-refs", "logs/HEAD"] {
            // Ref files and packed-refs are replaced by a rename; reflogs
            // are appended to in place, so a hard link would be written.
            let appended = relative.starts_with("logs/");
            let mut path = self.repo.path().to_path_buf();
            let mut steps = relative.split('/').peekable();
            while let Some(step) = steps.next() {
                path.push(step);
                let meta = match std::fs::symlink_metadata(&path) {
                    Ok(m) => m,
                    // What does not exist yet is created, not followed; and
                    // where a file stands for a directory, libgit2 says so.
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                        ) =>
                    {
                        break
                    }
                    Err(e) => return Err(RepoError::io(path, e)),
                };
                let kind = meta.file_type();
                let fine = if steps.peek().is_some() {
                    !kind.is_symlink()
                } else {
                    // A directory is libgit2's to refuse (refs/heads/a
                    // when refs/heads/a/b exists).
                    kind.is_dir()
                        || (kind.is_file()
                            && (!appended || std::os::unix::fs::MetadataExt::nlink(&meta) == 1))
                };
                if !fine {
                    return Err(RepoError::RefThroughSymlink {
                        name: name.to_string(),
                        link: path,
                    });
                }
            }
        }
        Ok(())
    }

    /// libgit2 reads packed-refs for any ref, following a symlink and
    /// waiting on a FIFO someone who can write the repository put there
    /// (which would hold the node's pass, and its group, for good).
    fn packed_refs_readable(&self, reading: &str) -> Result<(), RepoError> {
        let path = self.repo.path().join("packed-refs");
        match std::fs::symlink_metadata(&path) {
            Ok(m) if !m.file_type().is_file() => Err(RepoError::RefThroughSymlink {
                name: reading.to_string(),
                link: path,
            }),
            _ => Ok(()),
        }
    }

    /// Writes `name` = `oid` (overwriting), with a reflog that keeps every
    /// earlier value.
    fn keep_as(&self, name: &str, oid: Oid, message: &str) -> Result<(), RepoError> {
        self.refuse_symlinks_on_the_way(name)?;
        self.repo.reference_ensure_log(name)?;
        self.repo.reference(name, oid, true, message)?;
        Ok(())
    }

    fn keep_displaced(&self, name: &str, old: &str, message: &str) -> Result<(), RepoError> {
        let oid = parse_id(old)?;
        let stable = format!("{OWN_NAMESPACE}displaced/{name}");
        let write = |keep_as: &str| self.keep_as(keep_as, oid, message);
        // refs/heads/a and refs/heads/a/b can exist at different times, but
        // their displaced names cannot both be files: fall back to a unique name.
        if let Err(e) = write(&stable) {
            if let RepoError::RefThroughSymlink { .. } = e {
                return Err(e);
            }
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let unique = format!("{OWN_NAMESPACE}displaced/at-{nanos}/{name}");
            tracing::debug!(
                name,
                error = %e,
                keep_as = unique,
                "displaced name taken"
            );
            write(&unique)?;
        }
        Ok(())
    }

    /// Writes each (name, id) of `refs` as `<prefix><name>`, so a
    /// repository's own tips stay reachable while it is made to follow its
    /// group. Returns the names written.
    pub fn keep_under(
        &self,
        prefix: &str,
        refs: &BTreeMap<String, String>,
        message: &str,
    ) -> Result<Vec<String>, RepoError> {
        let mut written = Vec::new();
        for (name, id) in refs {
            let keep_as = format!("{prefix}{name}");
            self.keep_as(&keep_as, parse_id(id)?, message)?;
            written.push(keep_as);
        }
        Ok(written)
    }

    fn delete_ref(&self, name: &str, expected: Oid) -> Result<(), RepoError> {
        let mut reference = match self.repo.find_reference(name) {
            Ok(r) => r,
            Err(e) if e.code() == ErrorCode::NotFound => return Err(self.moved(name, None)),
            Err(e) => return Err(e.into()),
        };
        // A symbolic ref has no target id, so it never matches `expected`.
        if reference.target() != Some(expected) {
            return Err(self.moved(name, resolve(&reference)));
        }
        // libgit2 re-checks the value it read above under the ref lock, so a
        // push landing between the lookup and here makes this fail, not clobber.
        match reference.delete() {
            Ok(()) => {
                tracing::debug!(name, %expected, "local ref deleted");
                Ok(())
            }
            Err(e) => Err(self.cas_failure(name, e)?),
        }
    }

    /// Turns a libgit2 failure of a conditional write into RefMoved when the
    /// cause was the ref's value, or passes it through otherwise.
    fn cas_failure(&self, name: &str, e: git2::Error) -> Result<RepoError, RepoError> {
        let current = self.lookup(name)?;
        Ok(match e.code() {
            ErrorCode::Modified | ErrorCode::NotFound => self.moved(name, current),
            // EEXISTS also reports a directory/file clash (refs/heads/a vs
            // refs/heads/a/b); only an existing ref of that very name is a move.
            ErrorCode::Exists if current.is_some() => self.moved(name, current),
            _ => e.into(),
        })
    }

    fn moved(&self, name: &str, current: Option<Oid>) -> RepoError {
        RepoError::RefMoved {
            name: name.to_string(),
            current: current.map(|oid| oid.to_string()),
        }
    }

    fn lookup(&self, name: &str) -> Result<Option<Oid>, RepoError> {
        match self.repo.find_reference(name) {
            Ok(r) => Ok(resolve(&r)),
            Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn peel_commit(&self, id: &str) -> Option<Oid> {
        let oid = parse_id(id).ok()?;
        let object = self.repo.find_object(oid, None).ok()?;
        object.peel_to_commit().ok().map(|c| c.id())
    }
}

fn resolve(reference: &Reference<'_>) -> Option<Oid> {
    match reference.target() {
        Some(oid) => Some(oid),
        None => reference.resolve().ok().and_then(|r| r.target()),
    }
}

use piehole_protocol::validate::{is_replicated, OWN_NAMESPACE};

pub(crate) fn open_repository(path: &Path) -> Result<Repository, RepoError> {
    // Repository::open never searches parent directories nor honours GIT_DIR,
    // which matters when running inside a hook of some other repository.
    Repository::open(path).map_err(|e| match e.code() {
        ErrorCode::NotFound => RepoError::NotARepository(path.to_path_buf()),
        _ => e.into(),
    })
}

/// Accepts exactly 40 hex digits: `Oid::from_str` would silently zero-pad a
/// short prefix into a different id.
pub(crate) fn parse_id(id: &str) -> Result<Oid, RepoError> {
    if id.len() != 40 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RepoError::InvalidId(id.to_string()));
    }
    Oid::from_str(id).map_err(|_| RepoError::InvalidId(id.to_string()))
}

fn check_ref_name(name: &str) -> Result<(), RepoError> {
    if Reference::is_valid_name(name) {
        Ok(())
    } else {
        Err(RepoError::InvalidRefName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_id_wants_exactly_forty_hex_digits() {
        let id = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(parse_id(id).unwrap().to_string(), id);
        assert_eq!(
            parse_id(&id.to_uppercase()).unwrap().to_string(),
            id,
            "output is lowercase"
        );
        for bad in [
            "",
            "0123",
            &id[..39],
            &format!("{id}0"),
            &id.replace('a', "g"),
        ] {
            assert!(
                matches!(parse_id(bad), Err(RepoError::InvalidId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn remote_tracking_refs_are_not_replicated() {
        assert!(is_replicated("refs/heads/main"));
        assert!(is_replicated("refs/tags/v1"));
        assert!(!is_replicated("refs/remotes/origin/main"));
        assert!(!is_replicated("HEAD"));
        assert!(!is_replicated("refs/piehole/displaced/refs/heads/main"));
    }

    #[test]
    fn errors_are_one_line() {
        let moved = RepoError::RefMoved {
            name: "refs/heads/main".into(),
            current: None,
        };
        assert_eq!(
            moved.to_string(),
            "ref refs/heads/main has moved: it is now absent"
        );
        let git = RepoError::from(git2::Error::from_str("boom"));
        assert_eq!(git.to_string(), "git: boom");
    }
}
