//! Housekeeping for replicas that only receive through piehole. git runs
//! `gc --auto` after a push it receives itself; a replica fed packs by its
//! node never gets that, and its packs would pile up (one per push).

use std::process::{Command, Stdio};

use crate::{Replica, RepoError};

impl Replica {
    /// Runs `git gc --auto --quiet` in the repository and waits for it. git
    /// decides whether there is anything to do (gc.auto, gc.autoPackLimit)
    /// and takes its own lock, so concurrent runs and pushes are safe.
    pub fn gc_auto(&self) -> Result<(), RepoError> {
        let out = Command::new("git")
            .args(["gc", "--auto", "--quiet"])
            .current_dir(self.path())
            .env_remove("GIT_DIR")
            .env_remove("GIT_OBJECT_DIRECTORY")
            .env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES")
            .env_remove("GIT_QUARANTINE_PATH")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| RepoError::io(self.path(), e))?;
        if !out.status.success() {
            return Err(RepoError::io(
                self.path(),
                std::io::Error::other(format!(
                    "git gc --auto: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            ));
        }
        Ok(())
    }
}
