//! The hooks piehole installs: thin shims that exec `piehole hook`.
//!
//! With git 2.29 or newer, one `proc-receive` hook handles every ref of a
//! push (`receive.procReceiveRefs = refs/`), and the node moves the refs
//! itself. Older git gets the `update` and `post-update` pair instead.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use git2::{Config, ConfigLevel, Repository};

use crate::replica::open_repository;
use crate::RepoError;

/// Marker line present in every hook piehole writes; a hook containing it is "ours".
pub const MARKER: &str = "# piehole-managed hook";

/// The value of receive.procReceiveRefs that hands every ref to the hook.
const PROC_RECEIVE_REFS: &str = "refs/";
/// Pushes may not touch piehole's own namespace; git refuses them itself.
const HIDDEN_FROM_PUSHES: &str = "refs/piehole/";

const MODE: u32 = 0o755;

/// Which hooks a repository gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HookKind {
    /// git 2.29+: one process per push.
    #[default]
    ProcReceive,
    /// Older git: `update` per ref, then `post-update`.
    Update,
}

impl HookKind {
    /// The hooks piehole writes for this kind, in the order they are written.
    fn hooks(self) -> &'static [&'static str] {
        match self {
            HookKind::ProcReceive => &["proc-receive"],
            HookKind::Update => &["update", "post-update"],
        }
    }

    /// Hooks that would stop running for piehole's refs: a foreign `update`
    /// hook is skipped for refs a proc-receive hook handles.
    fn silenced(self) -> &'static [&'static str] {
        match self {
            HookKind::ProcReceive => &["update"],
            HookKind::Update => &[],
        }
    }

    /// The kind for a git version ("2.39.5"): proc-receive needs 2.29.
    pub fn for_git_version(version: &str) -> HookKind {
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) >= (2, 29) {
            HookKind::ProcReceive
        } else {
            HookKind::Update
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOptions {
    pub group: String,
    pub node_socket: PathBuf,
    pub piehole_exe: PathBuf,
    pub force: bool,
    pub kind: HookKind,
    /// The node's request timeout, recorded for the hooks' deadline.
    pub request_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallReport {
    pub hooks_written: Vec<String>,
    /// piehole's own hooks of the other kind, removed.
    pub hooks_removed: Vec<String>,
    /// Nothing had to change: hooks and config were already as asked.
    pub already_installed: bool,
}

/// Installs piehole's hooks and config into the bare repository at `repo_path`.
///
/// Every check happens before the first write, so a refusal (non-bare
/// repository, foreign hook without `force`) leaves the repository untouched.
/// Relative `piehole_exe` and `node_socket` are made absolute, because git runs
/// hooks from inside the repository, not from where install was run.
pub fn install(repo_path: &Path, opts: &InstallOptions) -> Result<InstallReport, RepoError> {
    let repo = open_repository(repo_path)?;
    if !repo.is_bare() {
        return Err(RepoError::NotBare(repo_path.to_path_buf()));
    }
    let exe = absolute(&opts.piehole_exe)?;
    let node = absolute(&opts.node_socket)?;
    let node = node
        .to_str()
        .ok_or_else(|| RepoError::NonUtf8Path(node.clone()))?;
    let dir = hooks_dir(&repo);

    let mut pending = Vec::new();
    for &name in opts.kind.hooks() {
        let path = dir.join(name);
        let wanted = script(&exe, name);
        if let Some(current) = read_hook(&path)? {
            if !is_ours(&current) && !opts.force {
                return Err(RepoError::ForeignHook(name.to_string()));
            }
            if current == wanted && mode(&path)? == MODE {
                continue;
            }
        }
        pending.push((name, wanted));
    }
    for &name in opts.kind.silenced() {
        if let Some(current) = read_hook(&dir.join(name))? {
            if !is_ours(&current) && !opts.force {
                return Err(RepoError::SilencedHook(name.to_string()));
            }
        }
    }
    // piehole's hooks of the other kind would run too, or fail the push.
    let mut stale = Vec::new();
    for name in ["proc-receive", "update", "post-update"] {
        if opts.kind.hooks().contains(&name) {
            continue;
        }
        if read_hook(&dir.join(name))?.is_some_and(|c| is_ours(&c)) {
            stale.push(name);
        }
    }

    fs::create_dir_all(&dir).map_err(|e| RepoError::io(&dir, e))?;
    let mut hooks_written = Vec::new();
    for (name, content) in pending {
        write_hook(&dir, name, &content)?;
        tracing::info!(hook = name, repo = %repo_path.display(), "hook written");
        hooks_written.push(name.to_string());
    }
    let mut hooks_removed = Vec::new();
    for name in stale {
        let path = dir.join(name);
        fs::remove_file(&path).map_err(|e| RepoError::io(&path, e))?;
        hooks_removed.push(name.to_string());
    }
    let config_changed = write_config(&repo, opts, node)?;
    Ok(InstallReport {
        already_installed: hooks_written.is_empty() && hooks_removed.is_empty() && !config_changed,
        hooks_written,
        hooks_removed,
    })
}

fn read_hook(path: &Path) -> Result<Option<Vec<u8>>, RepoError> {
    match fs::read(path) {
        Ok(c) => Ok(Some(c)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RepoError::io(path, e)),
    }
}

/// Problems with the repository's local setup, one human-readable line each.
/// An empty list means the local side is fine.
pub fn local_problems(repo_path: &Path) -> Result<Vec<String>, RepoError> {
    let repo = open_repository(repo_path)?;
    let mut problems = Vec::new();
    if !repo.is_bare() {
        problems.push("repository is not bare".to_string());
    }
    let config = repo.config()?;
    let dir = hooks_dir(&repo);
    // The update-hook install is recognised by its hook; anything else is
    // judged as the default kind.
    let legacy =
        !proc_receive_on(&config) && read_hook(&dir.join("update"))?.is_some_and(|c| is_ours(&c));
    let kind = if legacy {
        HookKind::Update
    } else {
        HookKind::ProcReceive
    };
    if kind == HookKind::ProcReceive && !proc_receive_on(&config) {
        problems.push(format!(
            "receive.procReceiveRefs is not {PROC_RECEIVE_REFS}, so git does not run the proc-receive hook"
        ));
    }
    for &name in kind.hooks() {
        let path = dir.join(name);
        match read_hook(&path)? {
            None => {
                problems.push(format!("hook {name} is missing"));
                continue;
            }
            Some(content) if !is_ours(&content) => {
                problems.push(format!("hook {name} is not piehole's"));
            }
            Some(_) => {}
        }
        if mode(&path)? & 0o111 == 0 {
            problems.push(format!("hook {name} is not executable"));
        }
    }
    if !reflog_on(&config) {
        problems.push("reflog is off (core.logAllRefUpdates)".to_string());
    }
    if let Some(other) = diverted_hooks(&repo, &config, &dir) {
        problems.push(format!(
            "core.hooksPath is {}, so git does not run the hooks in {}",
            other.display(),
            dir.display()
        ));
    }
    Ok(problems)
}

/// Whether receive.procReceiveRefs hands every ref to the proc-receive hook.
fn proc_receive_on(config: &Config) -> bool {
    multivar(config, "receive.procReceiveRefs")
        .iter()
        .any(|v| v == PROC_RECEIVE_REFS)
}

fn multivar(config: &Config, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(mut entries) = config.multivar(key, None) {
        while let Some(Ok(e)) = entries.next() {
            if let Some(v) = e.value() {
                out.push(v.to_string());
            }
        }
    }
    out
}

fn hooks_dir(repo: &Repository) -> PathBuf {
    repo.path().join("hooks")
}

fn script(exe: &Path, hook: &str) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(b"#!/bin/sh\n");
    s.extend_from_slice(MARKER.as_bytes());
    s.extend_from_slice(
        b" (written by `piehole install`; `piehole install --force` rewrites it)\n",
    );
    s.extend_from_slice(b"exec ");
    s.extend_from_slice(&shell_quote(exe.as_os_str().as_bytes()));
    s.extend_from_slice(format!(" hook {hook} \"$@\"\n").as_bytes());
    s
}

/// Single-quotes for sh: nothing is special inside '...' except the quote
/// itself, which becomes '\''.
fn shell_quote(raw: &[u8]) -> Vec<u8> {
    let mut out = vec![b'\''];
    for &b in raw {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

fn is_ours(content: &[u8]) -> bool {
    content
        .windows(MARKER.len())
        .any(|window| window == MARKER.as_bytes())
}

fn mode(path: &Path) -> Result<u32, RepoError> {
    let meta = fs::metadata(path).map_err(|e| RepoError::io(path, e))?;
    Ok(meta.permissions().mode() & 0o7777)
}

/// Writes through a temporary file and a rename, so a push running right
/// now sees either the old hook or the new one, never half a script.
fn write_hook(dir: &Path, name: &str, content: &[u8]) -> Result<(), RepoError> {
    let path = dir.join(name);
    let mut tmp = tempfile::Builder::new()
        .prefix(".piehole-")
        .tempfile_in(dir)
        .map_err(|e| RepoError::io(dir, e))?;
    tmp.write_all(content)
        .map_err(|e| RepoError::io(tmp.path(), e))?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(MODE))
        .map_err(|e| RepoError::io(tmp.path(), e))?;
    tmp.persist(&path)
        .map_err(|e| RepoError::io(&path, e.error))?;
    Ok(())
}

/// Returns whether anything had to change.
fn write_config(repo: &Repository, opts: &InstallOptions, node: &str) -> Result<bool, RepoError> {
    let mut local = repo.config()?.open_level(ConfigLevel::Local)?;
    let mut changed = false;
    // "always": tags and every other ref get a reflog too, so a tip the
    // replicator moves is still reachable from it.
    if local.get_string("core.logAllRefUpdates").ok().as_deref() != Some("always") {
        local.set_str("core.logAllRefUpdates", "always")?;
        changed = true;
    }
    // A push is acknowledged once its objects and refs are here: have git
    // (2.36+; older versions ignore the key) fsync them first. An operator's
    // own choice is left alone.
    if local.get_string("core.fsync").is_err() {
        local.set_str("core.fsync", "committed")?;
        changed = true;
    }
    let proc_receive = proc_receive_on(&local);
    match opts.kind {
        HookKind::ProcReceive if !proc_receive => {
            local.set_multivar("receive.procReceiveRefs", "^$", PROC_RECEIVE_REFS)?;
            changed = true;
        }
        HookKind::Update if proc_receive => {
            local.remove_multivar("receive.procReceiveRefs", "^refs/$")?;
            changed = true;
        }
        _ => {}
    }
    // The update hook decides one ref at a time: a push it could only
    // half-apply must not be offered as atomic.
    let atomic = match opts.kind {
        HookKind::ProcReceive => None,
        HookKind::Update => Some(false),
    };
    match (atomic, local.get_bool("receive.advertiseAtomic").ok()) {
        (Some(want), have) if have != Some(want) => {
            local.set_bool("receive.advertiseAtomic", want)?;
            changed = true;
        }
        (None, Some(false)) => {
            local.remove("receive.advertiseAtomic")?;
            changed = true;
        }
        _ => {}
    }
    if !multivar(&local, "receive.hideRefs")
        .iter()
        .any(|v| v == HIDDEN_FROM_PUSHES)
    {
        local.set_multivar("receive.hideRefs", "^$", HIDDEN_FROM_PUSHES)?;
        changed = true;
    }
    let timeout = opts.request_timeout_ms.map(|t| t.to_string());
    let mut keys = vec![
        ("piehole.group", Some(opts.group.as_str())),
        ("piehole.node", Some(node)),
    ];
    keys.push(("piehole.requestTimeoutMs", timeout.as_deref()));
    for (key, value) in keys {
        let Some(value) = value else { continue };
        if local.get_string(key).ok().as_deref() != Some(value) {
            local.set_str(key, value)?;
            changed = true;
        }
    }
    Ok(changed)
}

/// "always" (log every ref, tags included) is on too, and better.
fn reflog_on(config: &Config) -> bool {
    const KEY: &str = "core.logAllRefUpdates";
    config.get_bool(KEY).unwrap_or(false)
        || config
            .get_string(KEY)
            .is_ok_and(|v| v.eq_ignore_ascii_case("always"))
}

/// Where core.hooksPath sends git instead of our hooks directory, if anywhere.
fn diverted_hooks(repo: &Repository, config: &Config, ours: &Path) -> Option<PathBuf> {
    let configured = config.get_path("core.hooksPath").ok()?;
    // git resolves a relative hooksPath from where hooks run: GIT_DIR of a bare repo.
    let resolved = repo.path().join(&configured);
    let same = match (resolved.canonicalize(), ours.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => resolved == ours,
    };
    (!same).then_some(configured)
}

fn absolute(path: &Path) -> Result<PathBuf, RepoError> {
    std::path::absolute(path).map_err(|e| RepoError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_survives_quotes_and_specials() {
        assert_eq!(shell_quote(b"/usr/bin/piehole"), b"'/usr/bin/piehole'");
        assert_eq!(shell_quote(b"/a'b/$x `y`"), b"'/a'\\''b/$x `y`'");
    }

    #[test]
    fn marker_is_found_anywhere() {
        assert!(is_ours(script(Path::new("/x"), "update").as_slice()));
        assert!(!is_ours(b"#!/bin/sh\n# piehole-managed\n"));
    }
}
