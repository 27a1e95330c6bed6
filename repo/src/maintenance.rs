//! Housekeeping for replicas that only receive through piehole. git runs
//! `gc --auto` after a push it receives itself; a replica fed packs by its
//! node never gets that, and its packs would pile up (one per push).

use std::path::Path;
use std::process::{Command, Stdio};

use crate::{Replica, RepoError};

impl Replica {
    /// Runs `git gc --auto --quiet` in the repository and waits for it, if
    /// git would find something to do (the test `git gc --auto` makes
    /// itself, without a process). git takes its own lock, so concurrent
    /// runs and pushes are safe.
    ///
    /// Only in a repository that is this user's alone
    /// ([`RepoError::OthersCanChange`] otherwise): git reads the
    /// repository's config (`gc.recentObjectsHook` names a command), runs
    /// its hooks and writes through its symlinks, all with this process's
    /// rights. Hooks are off for it all the same.
    pub fn gc_auto(&self) -> Result<(), RepoError> {
        if !self.gc_due()? {
            return Ok(());
        }
        let git_dir = self.repo.path();
        ours_alone(git_dir)?;
        let out = Command::new("git")
            .args([
                "-c",
                "core.hooksPath=/dev/null",
                "-c",
                "gc.autoDetach=false",
            ])
            .args(["gc", "--auto", "--quiet"])
            .current_dir(git_dir)
            .env_remove("GIT_DIR")
            .env_remove("GIT_OBJECT_DIRECTORY")
            .env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES")
            .env_remove("GIT_QUARANTINE_PATH")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| RepoError::io(git_dir, e))?;
        if !out.status.success() {
            return Err(RepoError::io(
                git_dir,
                std::io::Error::other(format!(
                    "git gc --auto: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            ));
        }
        Ok(())
    }

    /// git's own test for `gc --auto`: more packs (without a .keep) than
    /// gc.autoPackLimit, or more loose objects than gc.auto, estimated from
    /// objects/17 as git does.
    fn gc_due(&self) -> Result<bool, RepoError> {
        let config = self.repo.config()?;
        let setting = |key: &str, default: i64| match config.get_i64(key) {
            Ok(v) => Ok(v),
            Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(default),
            Err(e) => Err(RepoError::from(e)),
        };
        let auto = setting("gc.auto", 6700)?;
        if auto <= 0 {
            return Ok(false);
        }
        let objects = self.repo.path().join("objects");
        let names = |dir: &Path| -> std::collections::HashSet<String> {
            std::fs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        let pack_limit = setting("gc.autoPackLimit", 50)?;
        if pack_limit > 0 {
            let in_pack = names(&objects.join("pack"));
            let packs = in_pack
                .iter()
                .filter_map(|n| n.strip_suffix(".pack"))
                .filter(|stem| !in_pack.contains(&format!("{stem}.keep")))
                .count();
            if packs as i64 > pack_limit {
                return Ok(true);
            }
        }
        let loose = names(&objects.join("17"))
            .iter()
            .filter(|n| n.len() == 38 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .count() as i64;
        Ok(loose > auto.saturating_add(255) / 256)
    }
}

/// Checks that no other user can change what git would read or write
/// under `git_dir`, nor swap the repository itself: nothing in it is a
/// symlink, and nothing in it or above it may be changed by another user.
/// Not looked at: the object files (git never executes them, only reads
/// them) and `hooks/` (gc runs with hooks off; gitolite makes them
/// symlinks). A group counts as others unless it is this user's own group
/// (as with umask 002 and a group per user); root counts as this user.
fn ours_alone(git_dir: &Path) -> Result<(), RepoError> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid and getegid have no preconditions and cannot fail.
    let (me, my_group) = unsafe { (libc::geteuid(), libc::getegid()) };
    let others_can_change = |meta: &std::fs::Metadata| {
        let mode = meta.mode();
        (meta.uid() != me && meta.uid() != 0)
            || mode & 0o002 != 0
            || (mode & 0o020 != 0 && meta.gid() != my_group)
    };
    let git_dir = std::fs::canonicalize(git_dir).map_err(|e| RepoError::io(git_dir, e))?;
    // Above it, a sticky directory (/tmp) lets nobody rename what is ours.
    for above in git_dir.ancestors().skip(1) {
        let meta = std::fs::metadata(above).map_err(|e| RepoError::io(above, e))?;
        if others_can_change(&meta) && meta.mode() & 0o1000 == 0 {
            return Err(RepoError::OthersCanChange(above.to_path_buf()));
        }
    }
    let objects = git_dir.join("objects");
    let hooks = git_dir.join("hooks");
    let mut stack = vec![git_dir.clone()];
    while let Some(path) = stack.pop() {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            // Gone since its directory was listed (a lock, a finished gc).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path != git_dir => continue,
            Err(e) => return Err(RepoError::io(&path, e)),
        };
        if path == hooks {
            continue;
        }
        if meta.file_type().is_symlink() || others_can_change(&meta) {
            return Err(RepoError::OthersCanChange(path));
        }
        if !meta.is_dir() {
            continue;
        }
        // objects/xx/<object> and objects/pack/<pack>: only their
        // directories matter, and there may be very many of them.
        let object_files = path.parent() == Some(objects.as_path())
            && path.file_name().is_some_and(|n| {
                n == "pack"
                    || (n.len() == 2 && n.to_string_lossy().bytes().all(|b| b.is_ascii_hexdigit()))
            });
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(RepoError::io(&path, e)),
        };
        for entry in entries.flatten() {
            if object_files && !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            stack.push(entry.path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_repository_is_ours_alone_unless_others_can_change_or_link_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let git_dir = dir.path().join("r.git");
        git2::Repository::init_bare(&git_dir).unwrap();
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let refused_at = |p: &Path| match ours_alone(&git_dir) {
            Err(RepoError::OthersCanChange(at)) => assert_eq!(at, p),
            other => panic!("expected a refusal at {}, got {other:?}", p.display()),
        };
        // Whatever the umask of whoever runs the test.
        for entry in walk(&git_dir) {
            let m = std::fs::symlink_metadata(&entry)
                .unwrap()
                .permissions()
                .mode();
            mode(&entry, m & !0o022);
        }
        ours_alone(&git_dir).unwrap();
        let hooks = git_dir.join("hooks");
        let config = git_dir.join("config");
        // umask 002 with a group of one's own: still ours.
        mode(&config, 0o664);
        ours_alone(&git_dir).unwrap();
        mode(&config, 0o646);
        refused_at(&config);
        mode(&config, 0o644);
        // Hooks do not run in the node's gc: not looked at.
        mode(&hooks, 0o757);
        ours_alone(&git_dir).unwrap();
        mode(&hooks, 0o755);
        // A group of others (the pushers'), where the test may give one.
        if std::os::unix::fs::chown(&config, None, Some(4242)).is_ok() {
            mode(&config, 0o664);
            refused_at(&config);
            std::os::unix::fs::chown(&config, None, Some(unsafe { libc::getegid() })).unwrap();
            mode(&config, 0o644);
        }
        // gitolite's hooks are symlinks: fine; a symlink anywhere else is not.
        std::os::unix::fs::symlink(dir.path(), hooks.join("update")).unwrap();
        ours_alone(&git_dir).unwrap();
        let link = git_dir.join("refs/heads/elsewhere");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        refused_at(&link);
        std::fs::remove_file(&link).unwrap();
        // Above the repository: a directory others may change.
        mode(dir.path(), 0o777);
        refused_at(dir.path());
        mode(dir.path(), 0o1777);
        ours_alone(&git_dir).unwrap();
    }

    #[test]
    fn gc_is_due_as_git_would_find_it() {
        let dir = tempfile::tempdir().unwrap();
        let git_dir = dir.path().join("r.git");
        let repo = git2::Repository::init_bare(&git_dir).unwrap();
        let replica = Replica::open(&git_dir).unwrap();
        assert!(!replica.gc_due().unwrap());
        repo.config()
            .unwrap()
            .set_i64("gc.autoPackLimit", 2)
            .unwrap();
        let pack = git_dir.join("objects/pack");
        for n in 0..3 {
            std::fs::write(pack.join(format!("pack-{n}.pack")), "").unwrap();
        }
        assert!(replica.gc_due().unwrap());
        std::fs::write(pack.join("pack-0.keep"), "").unwrap();
        assert!(!replica.gc_due().unwrap(), "a kept pack does not count");
        repo.config().unwrap().set_i64("gc.auto", 256).unwrap();
        let loose = git_dir.join("objects/17");
        std::fs::create_dir_all(&loose).unwrap();
        std::fs::write(loose.join("0".repeat(38)), "").unwrap();
        assert!(
            !replica.gc_due().unwrap(),
            "1 loose object is not more than 1"
        );
        std::fs::write(loose.join("1".repeat(38)), "").unwrap();
        assert!(replica.gc_due().unwrap());
        repo.config().unwrap().set_i64("gc.auto", 0).unwrap();
        assert!(!replica.gc_due().unwrap(), "gc.auto = 0 turns it off");
    }

    fn walk(root: &Path) -> Vec<std::path::PathBuf> {
        let mut out = vec![root.to_path_buf()];
        let mut i = 0;
        while i < out.len() {
            if out[i].is_dir() {
                for e in std::fs::read_dir(&out[i]).unwrap() {
                    out.push(e.unwrap().path());
                }
            }
            i += 1;
        }
        out
    }
}
