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
}

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
}
