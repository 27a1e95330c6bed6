//! Who may do what on this node: the local socket's callers (from
//! SO_PEERCRED and SO_PEERGROUPS), the repository roots a node acts under, and refusal logs
//! that an attacker cannot turn into a disk flood.
//!
//! The rules (SPEC §9):
//! - admin operations (clobber, ref cas, member changes, export/import,
//!   registering into a group that already has a replica) are for root, the
//!   node's own user and the members of `--admin-group`;
//! - a hook call, or registering a new group, is honoured only for a
//!   repository the caller can write, as git itself must to move its refs;
//! - reading a group's refs needs read access to this node's replica of it.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::Connected;
use tonic::{Request, Status};

/// The process on the other end of the local socket.
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    /// Primary and supplementary groups.
    pub gids: Vec<u32>,
}

impl Caller {
    /// Who called, as the local socket's accept loop recorded it.
    pub fn of<T>(req: &Request<T>) -> Result<Caller, Status> {
        req.extensions()
            .get::<Option<Caller>>()
            .cloned()
            .flatten()
            .ok_or_else(|| Status::permission_denied("the caller's identity is unknown"))
    }

    /// The credentials of the process that connected `stream`, taken when
    /// it connects (SO_PEERCRED, SO_PEERGROUPS): what it does later, or
    /// whoever it hands the socket to, cannot change them.
    pub fn of_stream(stream: &UnixStream) -> Option<Caller> {
        let cred = stream.peer_cred().ok()?;
        let mut gids = vec![cred.gid()];
        match peer_groups(stream.as_raw_fd()) {
            Some(groups) => gids.extend(groups),
            // Kernels before 4.13: the primary group only.
            None => {
                if REFUSALS.allow("SO_PEERGROUPS") {
                    tracing::warn!("the kernel does not tell a socket peer's groups; only primary groups count");
                }
            }
        }
        Some(Caller {
            uid: cred.uid(),
            gids,
        })
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gids.contains(&gid)
    }

    /// Whether the permission bits of `meta` grant this caller `want`
    /// (a mask of 4 read, 2 write, 1 search), as the kernel would decide
    /// for a process with these ids (ACLs aside). Root may do anything.
    fn may(&self, meta: &std::fs::Metadata, want: u32) -> bool {
        if self.uid == 0 {
            return true;
        }
        let mode = meta.mode();
        let bits = if meta.uid() == self.uid {
            mode >> 6
        } else if self.in_group(meta.gid()) {
            mode >> 3
        } else {
            mode
        };
        bits & want == want
    }
}

/// The supplementary groups of a Unix socket's peer (SO_PEERGROUPS).
fn peer_groups(fd: std::os::fd::RawFd) -> Option<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: groups is valid for len bytes; fd is an open socket.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Some(groups);
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) || n <= groups.len()
        {
            return None;
        }
        groups.resize(n, 0);
    }
}

/// A local socket connection with its caller's credentials, as tonic hands
/// them to every request on it.
pub struct Identified {
    stream: UnixStream,
    caller: Option<Caller>,
}

impl Identified {
    pub fn new(stream: UnixStream) -> Identified {
        let caller = Caller::of_stream(&stream);
        Identified { stream, caller }
    }
}

impl Connected for Identified {
    type ConnectInfo = Option<Caller>;

    fn connect_info(&self) -> Option<Caller> {
        self.caller.clone()
    }
}

impl AsyncRead for Identified {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Identified {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// This node's access rules.
#[derive(Debug, Clone)]
pub struct Access {
    /// The node's own effective uid: its user is an admin.
    pub node_uid: u32,
    /// `--admin-group`.
    pub admin_gid: Option<u32>,
    pub roots: RepoRoots,
}

impl Access {
    pub fn new(admin_gid: Option<u32>, roots: RepoRoots) -> Access {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let node_uid = unsafe { libc::geteuid() };
        Access {
            node_uid,
            admin_gid,
            roots,
        }
    }

    pub fn is_admin(&self, caller: &Caller) -> bool {
        caller.uid == 0
            || caller.uid == self.node_uid
            || self.admin_gid.is_some_and(|g| caller.in_group(g))
    }

    /// Refuses, with one line, a caller who is not an admin.
    pub fn require_admin<T>(&self, req: &Request<T>, what: &str) -> Result<Caller, Status> {
        let caller = Caller::of(req)?;
        self.admin_only(&caller, what)?;
        Ok(caller)
    }

    /// [`Access::require_admin`] for a caller already known.
    pub fn admin_only(&self, caller: &Caller, what: &str) -> Result<(), Status> {
        if self.is_admin(caller) {
            return Ok(());
        }
        let group = self
            .admin_gid
            .map(|g| format!(", members of group {g}"))
            .unwrap_or_default();
        refused(caller.uid, what);
        Err(Status::permission_denied(format!(
            "{what} is for the node's administrators (root, uid {}{group}); uid {} is not one",
            self.node_uid, caller.uid
        )))
    }

    /// Refuses a caller who could not move the refs of `repo` with git:
    /// one who cannot write its `refs` directory. For a caller who is not
    /// an admin, also a repository whose parts lead elsewhere: the node
    /// acts in it with its own rights, which may reach further.
    pub fn require_writer(&self, caller: &Caller, repo: &Path, what: &str) -> Result<(), Status> {
        if self.is_admin(caller) {
            return Ok(());
        }
        if let Err(why) = leads_elsewhere(repo) {
            refused(caller.uid, what);
            return Err(Status::permission_denied(format!("{what}: {why}")));
        }
        let refs = repo.join("refs");
        let dir = if refs.is_dir() {
            refs
        } else {
            repo.to_path_buf()
        };
        if std::fs::metadata(&dir).is_ok_and(|m| caller.may(&m, 0o3)) {
            return Ok(());
        }
        refused(caller.uid, what);
        Err(Status::permission_denied(format!(
            "{what}: uid {} cannot write {}",
            caller.uid,
            dir.display()
        )))
    }

    /// Refuses a caller who cannot read `repo`.
    pub fn require_reader(&self, caller: &Caller, repo: &Path, what: &str) -> Result<(), Status> {
        let ok = std::fs::metadata(repo).is_ok_and(|m| caller.may(&m, 0o5));
        if ok || self.is_admin(caller) {
            return Ok(());
        }
        refused(caller.uid, what);
        Err(Status::permission_denied(format!(
            "{what}: uid {} cannot read {}",
            caller.uid,
            repo.display()
        )))
    }
}

/// Refuses a repository whose refs, objects or packed refs are symlinks, or
/// that borrows objects from elsewhere (alternates): someone who can write
/// the repository could point the node at another one with them.
fn leads_elsewhere(repo: &Path) -> Result<(), String> {
    for part in ["refs", "refs/heads", "refs/tags", "objects", "packed-refs"] {
        let p = repo.join(part);
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(format!("{} is a symlink", p.display()));
        }
    }
    let alternates = repo.join("objects/info/alternates");
    if alternates.exists() {
        return Err(format!(
            "{} borrows objects from elsewhere ({})",
            repo.display(),
            alternates.display()
        ));
    }
    Ok(())
}

fn refused(uid: u32, what: &str) {
    if REFUSALS.allow(&format!("local {uid} {what}")) {
        tracing::warn!(uid, what, "local API call refused");
    }
}

/// `--repo-root`: the directories under which this node registers, reads,
/// writes and serves repositories. Empty: anywhere (a single-user host).
#[derive(Debug, Clone, Default)]
pub struct RepoRoots(Vec<PathBuf>);

impl RepoRoots {
    /// Canonical forms of the given roots, each of which must exist.
    pub fn new(roots: &[PathBuf]) -> Result<RepoRoots, String> {
        roots
            .iter()
            .map(|r| {
                r.canonicalize()
                    .map_err(|e| format!("--repo-root {}: {e}", r.display()))
            })
            .collect::<Result<_, _>>()
            .map(RepoRoots)
    }

    /// Whether `path` (absolute) lies under a root. The path is resolved
    /// first when it exists, so a symlink cannot lead out of the roots; a
    /// path with `..` or `.` components is never under one.
    pub fn contains(&self, path: &Path) -> bool {
        if self.0.is_empty() {
            return true;
        }
        if piehole_protocol::validate::repo_path(&path.to_string_lossy()).is_err() {
            return false;
        }
        let real = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        self.0
            .iter()
            .any(|root| real.starts_with(root) && path.starts_with(root))
    }

    /// Refuses a path outside the roots, with one line naming them.
    pub fn check(&self, path: &Path) -> Result<(), String> {
        if self.contains(path) {
            return Ok(());
        }
        let roots: Vec<String> = self.0.iter().map(|r| r.display().to_string()).collect();
        Err(format!(
            "{} is outside this node's repository roots ({})",
            path.display(),
            roots.join(", ")
        ))
    }
}

/// Refusal logs, rate-limited per key: a caller hammering a port with bad
/// requests must not fill the disk with warnings. At most one line per key
/// every `every`; the rest are counted and reported with the next line that
/// gets out.
pub struct RefusalLog {
    seen: Mutex<HashMap<String, (Instant, u64)>>,
    every: Duration,
}

pub static REFUSALS: std::sync::LazyLock<RefusalLog> =
    std::sync::LazyLock::new(|| RefusalLog::every(Duration::from_secs(10)));

impl RefusalLog {
    /// A log of its own, so that its keys (one per ref, say) never crowd
    /// out another's.
    pub fn every(every: Duration) -> RefusalLog {
        RefusalLog {
            seen: Mutex::default(),
            every,
        }
    }

    /// Whether to log a refusal under `key` now.
    pub fn allow(&self, key: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if seen.len() > 10_000 {
            seen.retain(|_, (at, _)| now.duration_since(*at) < self.every);
            if seen.len() > 10_000 {
                seen.clear(); // keys from many sources at once: start over
            }
        }
        match seen.get_mut(key) {
            Some((at, suppressed)) if now.duration_since(*at) < self.every => {
                *suppressed += 1;
                false
            }
            Some((at, suppressed)) => {
                if *suppressed > 0 {
                    tracing::warn!(key, suppressed = *suppressed, "refusals not logged");
                }
                *at = now;
                *suppressed = 0;
                true
            }
            None => {
                seen.insert(key.to_string(), (now, 0));
                true
            }
        }
    }
}

/// A group given by name or number, as `--admin-group` and `--socket-group`
/// take it.
pub fn resolve_group(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c = std::ffi::CString::new(name).map_err(|_| format!("group {name:?} is not a name"))?;
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives it.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return Err(format!("no such group {name:?}"));
    }
    Ok(group.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_hold_only_paths_beneath_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("git");
        std::fs::create_dir_all(root.join("a.git")).unwrap();
        std::fs::create_dir_all(dir.path().join("private.git")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("private.git"), root.join("link.git")).unwrap();
        let roots = RepoRoots::new(std::slice::from_ref(&root)).unwrap();
        let root = root.canonicalize().unwrap();
        assert!(roots.contains(&root.join("a.git")));
        assert!(roots.contains(&root.join("new.git")), "not yet created");
        assert!(!roots.contains(&root.join("link.git")), "a symlink out");
        assert!(!roots.contains(&root.join("../private.git")));
        assert!(!roots.contains(&dir.path().canonicalize().unwrap().join("private.git")));
        assert!(RepoRoots::default().contains(Path::new("/anywhere")));
        assert!(RepoRoots::new(&[dir.path().join("missing")]).is_err());
    }

    #[test]
    fn refusal_logs_are_rate_limited_per_key() {
        let log = RefusalLog::every(Duration::from_secs(10));
        assert!(log.allow("a"));
        assert!(!log.allow("a"));
        assert!(log.allow("b"));
    }

    #[test]
    fn groups_by_number_or_name() {
        assert_eq!(resolve_group("4242"), Ok(4242));
        assert_eq!(resolve_group("root"), Ok(0));
        assert!(resolve_group("no-such-group-here").is_err());
    }
}
