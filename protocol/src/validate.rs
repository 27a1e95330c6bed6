//! Validation of names and ids. Everything that crosses a trust boundary goes
//! through here, so that bad input is refused before it can change anything.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum InvalidInput {
    #[error("invalid ref name {0:?}: {1}")]
    RefName(String, &'static str),
    #[error("invalid object id {0:?}: expected 40 hex characters")]
    ObjectId(String),
    #[error("invalid group name {0:?}: {1}")]
    GroupName(String, &'static str),
    #[error("invalid repository path {0:?}: {1}")]
    RepoPath(String, &'static str),
    #[error("invalid replicated command: {0}")]
    Command(String),
}

/// Most ref updates one replicated command may carry (a `git push --mirror`
/// of a big repository, a group's first refs).
pub const MAX_COMMAND_REFS: usize = 100_000;

/// git's all-zeros id, which git uses for "no such ref".
pub const ZERO_ID: &str = "0000000000000000000000000000000000000000";

/// Where piehole keeps tips it moved out of the way (a deleted or rewound
/// ref, a repository's own branches at a forced install). Never replicated,
/// never pushed to.
pub const OWN_NAMESPACE: &str = "refs/piehole/";

/// Whether piehole keeps a ref in agreement: everything under `refs/` except
/// remote-tracking refs and piehole's own namespace.
pub fn is_replicated(name: &str) -> bool {
    name.starts_with("refs/")
        && !name.starts_with("refs/remotes/")
        && !name.starts_with(OWN_NAMESPACE)
}

/// Checks a ref name by git's `check-ref-format` rules, and that piehole
/// replicates it: it must live under `refs/` but not `refs/remotes/` nor
/// `refs/piehole/`.
pub fn ref_name(name: &str) -> Result<(), InvalidInput> {
    let bad = |why| Err(InvalidInput::RefName(name.to_string(), why));
    if name.len() > 1024 {
        return bad("longer than 1024 bytes");
    }
    if !name.starts_with("refs/") {
        return bad("must start with refs/");
    }
    if name.starts_with("refs/remotes/") {
        return bad("refs/remotes/ is not replicated");
    }
    if name.starts_with(OWN_NAMESPACE) {
        return bad("refs/piehole/ is piehole's own namespace");
    }
    if name.ends_with('/') {
        return bad("must not end with /");
    }
    if name.ends_with('.') {
        return bad("must not end with .");
    }
    if name.contains("..") {
        return bad("must not contain ..");
    }
    if name.contains("@{") {
        return bad("must not contain @{");
    }
    for c in name.chars() {
        if c.is_ascii_control() {
            return bad("must not contain control characters");
        }
        if matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\') {
            return bad("must not contain space, ~, ^, :, ?, *, [ or \\");
        }
    }
    for component in name.split('/') {
        if component.is_empty() {
            return bad("must not contain an empty component (//)");
        }
        if component.starts_with('.') {
            return bad("a component must not start with .");
        }
        if component.ends_with(".lock") {
            return bad("a component must not end with .lock");
        }
    }
    Ok(())
}

/// Checks an object id as it travels inside piehole: 40 lowercase hex
/// characters, or empty for "absent". git's all-zeros spelling of "absent"
/// is converted at the edge ([`git_object_id`]) and refused here, so it can
/// never become a stored value.
pub fn object_id(id: &str) -> Result<(), InvalidInput> {
    if id.is_empty() || (is_hex40(id) && id != ZERO_ID) {
        Ok(())
    } else {
        Err(InvalidInput::ObjectId(id.to_string()))
    }
}

/// Converts an id as git passes it to hooks (40 hex, all zeros for absent)
/// into piehole's form (lowercase, empty for absent).
pub fn git_object_id(id: &str) -> Result<String, InvalidInput> {
    if !is_hex40(&id.to_ascii_lowercase()) {
        return Err(InvalidInput::ObjectId(id.to_string()));
    }
    if id == ZERO_ID {
        Ok(String::new())
    } else {
        Ok(id.to_ascii_lowercase())
    }
}

fn is_hex40(id: &str) -> bool {
    id.len() == 40
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks a group name. It becomes part of file names and keys, so it must
/// not be able to name a path: no `/`, no `..`, no NUL, not empty.
pub fn group_name(name: &str) -> Result<(), InvalidInput> {
    let bad = |why| Err(InvalidInput::GroupName(name.to_string(), why));
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > 255 {
        return bad("longer than 255 bytes");
    }
    if name.contains('/') || name.contains('\\') {
        return bad("must not contain / or \\");
    }
    if name.contains("..") || name == "." {
        return bad("must not contain ..");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("must not start with . or -");
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return bad("must not contain control characters or whitespace");
    }
    Ok(())
}

/// Checks a replica's path as it is registered and replicated: absolute,
/// already normalised (no `.` or `..` component, no `//`), no NUL, at most
/// 4096 bytes. Whether it lies under the node's repository roots is the
/// node's own check: only it knows its roots.
pub fn repo_path(path: &str) -> Result<(), InvalidInput> {
    let bad = |why| Err(InvalidInput::RepoPath(path.to_string(), why));
    if path.len() > 4096 {
        return bad("longer than 4096 bytes");
    }
    if !path.starts_with('/') {
        return bad("must be absolute");
    }
    if path.contains('\0') || path.chars().any(|c| c.is_control()) {
        return bad("must not contain control characters");
    }
    if path.len() > 1 && path.ends_with('/') {
        return bad("must not end with /");
    }
    for component in path.split('/').skip(1) {
        match component {
            "" if path != "/" => return bad("must not contain an empty component (//)"),
            "." | ".." => return bad("must not contain . or .. components"),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a replicated command as it is proposed and again as it is
/// applied: a peer holding the cluster secret can put anything in the log,
/// so nothing in it is trusted for being there.
pub fn command(cmd: &crate::pb::Command) -> Result<(), InvalidInput> {
    use crate::pb::command::Op;
    let bad = |why: String| Err(InvalidInput::Command(why));
    match &cmd.op {
        None => bad("no operation".into()),
        Some(Op::Read(_)) => Ok(()),
        Some(Op::Claim(c)) if c.node_id == 0 => bad("claim of node id 0".into()),
        Some(Op::Claim(_)) => Ok(()),
        Some(Op::Register(r)) => {
            group_name(&r.group)?;
            if r.node_id == 0 {
                return bad("register for node id 0".into());
            }
            repo_path(&r.path)
        }
        Some(Op::Push(p)) => {
            group_name(&p.group)?;
            if p.updates.is_empty() || p.updates.len() > MAX_COMMAND_REFS {
                return bad(format!(
                    "a push carries 1 to {MAX_COMMAND_REFS} updates, not {}",
                    p.updates.len()
                ));
            }
            for u in &p.updates {
                ref_name(&u.ref_name)?;
                object_id(&u.expected)?;
                object_id(&u.new)?;
            }
            Ok(())
        }
        Some(Op::Clobber(c)) => {
            group_name(&c.group)?;
            if c.refs.len() > MAX_COMMAND_REFS {
                return bad(format!(
                    "a clobber carries at most {MAX_COMMAND_REFS} refs, not {}",
                    c.refs.len()
                ));
            }
            for r in &c.refs {
                ref_name(&r.ref_name)?;
                if r.value.is_empty() {
                    return bad(format!("clobber sets {} to nothing", r.ref_name));
                }
                object_id(&r.value)?;
            }
            Ok(())
        }
    }
}

/// Checks a state snapshot before it replaces a node's state: every name,
/// id and path in it, as if each had arrived in its own command.
pub fn snapshot(s: &crate::pb::StateSnapshot) -> Result<(), InvalidInput> {
    for g in &s.groups {
        group_name(&g.name)?;
        for r in &g.refs {
            ref_name(&r.ref_name)?;
            if r.value.is_empty() {
                return Err(InvalidInput::Command(format!(
                    "snapshot: {} {} has no value",
                    g.name, r.ref_name
                )));
            }
            object_id(&r.value)?;
        }
        for r in &g.replicas {
            if r.node_id == 0 {
                return Err(InvalidInput::Command(format!(
                    "snapshot: group {} has a replica on node 0",
                    g.name
                )));
            }
            repo_path(&r.path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_refs() {
        for ok in [
            "refs/heads/main",
            "refs/tags/v1.0",
            "refs/heads/feature/x-y_z",
            "refs/notes/commits",
        ] {
            assert_eq!(ref_name(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_what_check_ref_format_refuses() {
        for bad in [
            "HEAD",
            "main",
            "refs/heads/",
            "refs/heads/a..b",
            "refs/heads/.hidden",
            "refs/heads/x.lock",
            "refs/heads/a//b",
            "refs/heads/a b",
            "refs/heads/a~1",
            "refs/heads/a^",
            "refs/heads/a:b",
            "refs/heads/a?",
            "refs/heads/a*",
            "refs/heads/a[",
            "refs/heads/a\\b",
            "refs/heads/a@{1}",
            "refs/heads/end.",
            "refs/heads/nul\0",
            "refs/heads/del\x7f",
            "refs/remotes/origin/main",
            "refs/piehole/displaced/refs/heads/main",
        ] {
            assert!(ref_name(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn object_ids() {
        assert!(object_id("").is_ok());
        assert!(object_id(&"a".repeat(40)).is_ok());
        assert!(object_id(&"a".repeat(39)).is_err());
        assert!(object_id(&"A".repeat(40)).is_err());
        assert!(object_id(&"g".repeat(40)).is_err());
        assert!(object_id(ZERO_ID).is_err());
        assert_eq!(git_object_id(ZERO_ID), Ok(String::new()));
        assert_eq!(git_object_id(&"AB".repeat(20)), Ok("ab".repeat(20)));
        assert!(git_object_id("xyz").is_err());
    }

    #[test]
    fn group_names_cannot_name_paths() {
        assert!(group_name("project").is_ok());
        assert!(group_name("my-repo.v2").is_ok());
        for bad in ["", "a/b", "..", "a..b", "x\0y", ".git", "-x", "a b", "/etc"] {
            assert!(group_name(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn repo_paths_are_absolute_and_normalised() {
        for ok in ["/srv/git/a.git", "/", "/a b/c"] {
            assert_eq!(repo_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "srv/a.git",
            "/srv/../etc",
            "/srv/./a",
            "/srv//a",
            "/srv/a/",
            "/srv/a\0b",
            "/srv/a\nb",
        ] {
            assert!(repo_path(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
