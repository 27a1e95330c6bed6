use std::path::PathBuf;

/// Everything that can go wrong in the git layer. Each variant renders as one
/// line fit for a user's terminal or a hook's stderr.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{}: not a git repository", .0.display())]
    NotARepository(PathBuf),

    #[error("{}: repository is not bare", .0.display())]
    NotBare(PathBuf),

    #[error("invalid object id {0:?} (expected 40 hex digits)")]
    InvalidId(String),

    #[error("invalid ref name {0:?}")]
    InvalidRefName(String),

    #[error("object {0} is not in the repository")]
    MissingObject(String),

    #[error("ref {name} has moved: it is now {}", .current.as_deref().unwrap_or("absent"))]
    RefMoved {
        name: String,
        current: Option<String>,
    },

    /// Another writer holds the ref's lock. `stale_at`: when the lock will
    /// count as left by a dead process, if it is still there then.
    #[error("ref {name} is locked by another writer")]
    RefLocked {
        name: String,
        stale_at: Option<std::time::SystemTime>,
    },

    #[error("hook {0} exists and is not piehole's (use --force to overwrite it)")]
    ForeignHook(String),

    #[error("hook {0} is not piehole's and would stop running for the refs piehole's proc-receive hook handles (use --force to install anyway)")]
    SilencedHook(String),

    #[error("bad pack: {0}")]
    BadPack(String),

    #[error("ref {name}: {} is a symlink, not a plain file, or a reflog hard-linked elsewhere; refs are not written through one", .link.display())]
    RefThroughSymlink { name: String, link: PathBuf },

    #[error("{}: a symlink or not a directory, and packs are not written through one", .0.display())]
    PacksElsewhere(PathBuf),

    /// The repository is not this process's user's alone: `0` is what
    /// another user (or a group) can change, or a symlink.
    #[error("{}: others can change it", .0.display())]
    OthersCanChange(PathBuf),

    #[error("{}: path is not valid UTF-8", .0.display())]
    NonUtf8Path(PathBuf),

    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    // libgit2's Display appends "; class=..; code=.."; the message alone reads better.
    #[error("git: {}", .0.message())]
    Git(#[from] git2::Error),
}

impl RepoError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> RepoError {
        RepoError::Io {
            path: path.into(),
            source,
        }
    }
}
