//! The `piehole.*` keys of one repository, read the cheap way.

use std::path::{Path, PathBuf};

use git2::{Config, ErrorCode};

use crate::RepoError;

/// What `piehole install` recorded in the repository's config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PieholeConfig {
    pub group: Option<String>,
    pub node: Option<PathBuf>,
    /// The node's request timeout as install found it; hooks wait this long
    /// plus a margin.
    pub request_timeout_ms: Option<u64>,
}

/// Reads piehole.group and piehole.node from `GIT_DIR/config` alone.
///
/// This runs on every push inside the hook, so it opens just that one file:
/// no repository discovery, no object database, no global or system config
/// (install writes these keys to the repository's file only).
pub fn read(git_dir: &Path) -> Result<PieholeConfig, RepoError> {
    let config = Config::open(&git_dir.join("config"))?;
    Ok(PieholeConfig {
        group: get(&config, "piehole.group")?,
        node: get(&config, "piehole.node")?.map(PathBuf::from),
        request_timeout_ms: get(&config, "piehole.requestTimeoutMs")?.and_then(|v| v.parse().ok()),
    })
}

fn get(config: &Config, key: &str) -> Result<Option<String>, RepoError> {
    match config.get_string(key) {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}
