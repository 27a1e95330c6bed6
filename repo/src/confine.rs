//! Writes into a replica, confined to it by the kernel (Landlock).
//!
//! The node writes refs, reflogs and packs with its own rights, into
//! repositories that others (the pushers of a shared repository) can write
//! too. The symlink checks in [`crate::Replica`] refuse what is there when
//! they look; a pusher who swaps a directory for a symlink between that
//! look and libgit2's write would still lead the write out of the
//! repository. A thread confined to the repository cannot follow it there:
//! the kernel resolves every path it creates, writes, renames or removes,
//! and refuses those that end outside.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::{mpsc, OnceLock};

use crate::RepoError;

// From linux/landlock.h (libc has the syscall numbers, not these).
const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: u32 = 1;
const FS_WRITE_FILE: u64 = 1 << 1;
const FS_REMOVE_DIR: u64 = 1 << 4;
const FS_REMOVE_FILE: u64 = 1 << 5;
const FS_MAKE_CHAR: u64 = 1 << 6;
const FS_MAKE_DIR: u64 = 1 << 7;
const FS_MAKE_REG: u64 = 1 << 8;
const FS_MAKE_SOCK: u64 = 1 << 9;
const FS_MAKE_FIFO: u64 = 1 << 10;
const FS_MAKE_BLOCK: u64 = 1 << 11;
const FS_MAKE_SYM: u64 = 1 << 12;
/// ABI 2: renames and links between directories (ABI 1 refuses those
/// always, and every rename git makes here stays in its directory).
const FS_REFER: u64 = 1 << 13;
/// ABI 3.
const FS_TRUNCATE: u64 = 1 << 14;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The Landlock ABI this kernel offers, if any.
fn abi() -> Option<i64> {
    static ABI: OnceLock<Option<i64>> = OnceLock::new();
    *ABI.get_or_init(|| {
        // SAFETY: with a null attribute and size 0 and this flag, the call
        // only returns the ABI version (or fails); it reads no memory.
        let v = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<RulesetAttr>(),
                0usize,
                CREATE_RULESET_VERSION,
            )
        };
        if v < 1 {
            return None;
        }
        // Offered is not allowed: a seccomp filter (a container's) may
        // refuse the rest. Tried once, on a thread of its own.
        let works = std::thread::spawn(move || {
            let root = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
                .open("/")?;
            restrict_to(&root, v)
        })
        .join()
        .is_ok_and(|r| r.is_ok());
        works.then_some(v)
    })
}

/// Whether writes can be confined on this kernel: false means they run
/// unconfined, with the symlink checks alone.
pub fn available() -> bool {
    abi().is_some()
}

/// The repository directory as it resolves now (a symlink put in its
/// place later does not move the confinement), and the ABI; None without
/// Landlock.
fn pin(repo: &Path) -> Result<Option<(std::fs::File, i64)>, RepoError> {
    let Some(abi) = abi() else {
        return Ok(None);
    };
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(repo)
        .map_err(|e| RepoError::io(repo, e))?;
    Ok(Some((dir, abi)))
}

fn thread_named() -> std::thread::Builder {
    std::thread::Builder::new().name("piehole-confined".into())
}

/// Runs `f` on a thread of its own that may create, write, rename and
/// remove files beneath `repo` only (reads are not limited). Without
/// Landlock it runs `f` here, as it is. `f` must not start threads or
/// thread pools (the node's database does, lazily): they would inherit
/// the confinement for good. [`Writer`] is for work that reads the
/// database between writes.
pub fn confined<T: Send>(
    repo: &Path,
    f: impl FnOnce() -> Result<T, RepoError> + Send,
) -> Result<T, RepoError> {
    let Some((dir, abi)) = pin(repo)? else {
        return f();
    };
    std::thread::scope(|s| {
        let worker = thread_named()
            .spawn_scoped(s, || {
                restrict_to(&dir, abi).map_err(|e| RepoError::io(repo, e))?;
                f()
            })
            .map_err(|e| RepoError::io(repo, e))?;
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

type Job<R> = Box<dyn FnOnce(&R) + Send>;

/// The confined thread: where jobs go, and how it ended.
type Worker<R> = (
    mpsc::Sender<Job<R>>,
    std::thread::JoinHandle<Result<(), RepoError>>,
);

/// A confined thread ([`confined`]) that holds `R` (a repository it opens
/// itself) and runs the writes handed to it one by one, while the caller's
/// thread stays free to read the node's database between them. Started at
/// the first write: a pass with nothing to write costs nothing.
pub struct Writer<R: 'static> {
    repo: std::path::PathBuf,
    open: fn(&Path) -> Result<R, RepoError>,
    worker: Option<Worker<R>>,
}

impl<R: 'static> Writer<R> {
    pub fn new(repo: &Path, open: fn(&Path) -> Result<R, RepoError>) -> Writer<R> {
        Writer {
            repo: repo.to_path_buf(),
            open,
            worker: None,
        }
    }

    /// Runs `f` on the confined thread and returns what it returned.
    pub fn call<U: Send + 'static>(
        &mut self,
        f: impl FnOnce(&R) -> U + Send + 'static,
    ) -> Result<U, RepoError> {
        if self.worker.is_none() {
            self.worker = Some(self.start()?);
        }
        let (jobs, _) = self.worker.as_ref().expect("started above");
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job<R> = Box::new(move |r: &R| {
            let _ = tx.send(f(r));
        });
        if jobs.send(job).is_ok() {
            if let Ok(out) = rx.recv() {
                return Ok(out);
            }
        }
        // The thread is gone: it says why.
        Err(self.stop().err().unwrap_or_else(|| {
            RepoError::io(
                &self.repo,
                std::io::Error::other("the confined writer stopped"),
            )
        }))
    }

    fn start(&self) -> Result<Worker<R>, RepoError> {
        let pinned = pin(&self.repo)?;
        let (tx, rx) = mpsc::channel::<Job<R>>();
        let (repo, open) = (self.repo.clone(), self.open);
        let worker = thread_named()
            .spawn(move || {
                if let Some((dir, abi)) = pinned {
                    restrict_to(&dir, abi).map_err(|e| RepoError::io(&repo, e))?;
                }
                let r = open(&repo)?;
                for job in rx {
                    job(&r);
                }
                Ok(())
            })
            .map_err(|e| RepoError::io(&self.repo, e))?;
        Ok((tx, worker))
    }

    /// Ends the thread (after the write in hand) and returns its outcome.
    fn stop(&mut self) -> Result<(), RepoError> {
        let Some((jobs, worker)) = self.worker.take() else {
            return Ok(());
        };
        drop(jobs);
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

impl<R: 'static> Drop for Writer<R> {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Confines the calling thread (for good) to writing beneath `dir`.
fn restrict_to(dir: &std::fs::File, abi: i64) -> std::io::Result<()> {
    // Handled: refused outside `dir`. Allowed beneath it: only what git
    // needs there (no devices, FIFOs, sockets or symlinks).
    let mut allowed = FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG;
    if abi >= 2 {
        allowed |= FS_REFER;
    }
    if abi >= 3 {
        allowed |= FS_TRUNCATE;
    }
    let handled =
        allowed | FS_MAKE_CHAR | FS_MAKE_SOCK | FS_MAKE_FIFO | FS_MAKE_BLOCK | FS_MAKE_SYM;
    let attr = RulesetAttr {
        handled_access_fs: handled,
    };
    let check = |r: i64| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    // SAFETY: `attr` is a valid landlock_ruleset_attr of the size given
    // (the kernel accepts a prefix of the struct); the result is a new fd.
    let ruleset = check(unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0u32,
        )
    })?;
    // SAFETY: the kernel just returned this fd, and nothing else owns it.
    let ruleset = unsafe { OwnedFd::from_raw_fd(ruleset as i32) };
    let beneath = PathBeneathAttr {
        allowed_access: allowed,
        parent_fd: dir.as_raw_fd(),
    };
    // SAFETY: a valid landlock_path_beneath_attr for a rule of that type,
    // on the ruleset fd above.
    check(unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            RULE_PATH_BENEATH,
            &beneath as *const PathBeneathAttr,
            0u32,
        )
    })?;
    // Without it only a process with CAP_SYS_ADMIN may restrict itself; it
    // also holds for this thread only, like the restriction.
    // SAFETY: prctl with these arguments only sets the thread's flag.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into())?;
    // SAFETY: restricts the calling thread with the ruleset fd above.
    check(unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confined_write_cannot_leave_the_repository_even_through_a_symlink() {
        if !available() {
            eprintln!("Landlock is not available on this kernel: nothing to check");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("r.git");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(repo.join("refs/heads")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), "untouched\n").unwrap();
        std::os::unix::fs::symlink(&outside, repo.join("refs/heads/evil")).unwrap();
        let written = confined(&repo, || {
            let inside = std::fs::write(repo.join("refs/heads/main"), "ok\n");
            let through = std::fs::write(repo.join("refs/heads/evil/new"), "x\n");
            let removed = std::fs::remove_file(repo.join("refs/heads/evil/victim"));
            let renamed = std::fs::rename(
                repo.join("refs/heads/main"),
                repo.join("refs/heads/evil/moved"),
            );
            Ok((inside, through, removed, renamed))
        })
        .unwrap();
        assert!(written.0.is_ok(), "{:?}", written.0);
        for (what, r) in [
            ("a write", written.1),
            ("a removal", written.2),
            ("a rename", written.3),
        ] {
            let e = r.expect_err(what);
            // ABI 1 refuses a rename between directories with EXDEV.
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::CrossesDevices
                ),
                "{what}: {e}"
            );
        }
        assert_eq!(
            std::fs::read_to_string(outside.join("victim")).unwrap(),
            "untouched\n"
        );
        assert!(!outside.join("new").exists());
        // This thread was never confined.
        std::fs::write(outside.join("free"), "y\n").unwrap();
    }

    #[test]
    fn a_writer_writes_inside_on_its_confined_thread_and_nowhere_else() {
        if !available() {
            eprintln!("Landlock is not available on this kernel: nothing to check");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("r.git");
        std::fs::create_dir(&repo).unwrap();
        let outside = dir.path().join("outside");
        let mut writer = Writer::new(&repo, |p| Ok(p.to_path_buf()));
        let inside = writer
            .call(|r: &std::path::PathBuf| std::fs::write(r.join("ok"), "ok"))
            .unwrap();
        assert!(inside.is_ok(), "{inside:?}");
        let out = outside.clone();
        let escaped = writer.call(move |_| std::fs::write(&out, "x")).unwrap();
        assert!(escaped.is_err(), "a write outside from the writer's thread");
        assert!(!outside.exists());
        // The caller's thread is free.
        drop(writer);
        std::fs::write(&outside, "y").unwrap();
    }

    #[test]
    fn a_writer_that_cannot_open_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer: Writer<()> = Writer::new(dir.path(), |p| {
            Err(RepoError::NotARepository(p.to_path_buf()))
        });
        let e = writer.call(|_| ()).unwrap_err();
        assert!(matches!(e, RepoError::NotARepository(_)), "{e:?}");
    }
}
