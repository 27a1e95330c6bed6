//! The connectivity check behind [`Replica::is_complete`].
//!
//! Walking every object reachable from a tip would cost a full history walk
//! on each push. Like git's own check after receiving a pack (`rev-list
//! --objects --not --all`), we trust that whatever the repository's refs
//! already reach is complete, a property git and `set_ref` both maintain, and
//! walk only what is new. Trees of a new commit are compared against the tree
//! of a parent that is known complete, so only changed subtrees are read.

use std::collections::HashSet;

use git2::{ErrorCode, ObjectType, Odb, Oid, Repository, Sort, Tree};

use crate::replica::parse_id;
use crate::{Replica, RepoError};

impl Replica {
    /// The object and everything reachable from it are present. Used before
    /// moving a ref, so a ref never points at a missing object.
    pub fn is_complete(&self, id: &str) -> Result<bool, RepoError> {
        self.completeness()?.is_complete(id)
    }

    /// A checker for many objects in a row (a pass over a group's refs):
    /// the repository's refs are read once, and every commit it proves
    /// complete shortens the walks after it.
    pub fn completeness(&self) -> Result<Completeness<'_>, RepoError> {
        let mut known = Vec::new();
        for reference in self.repo.references()? {
            if let Ok(commit) = reference?.peel_to_commit() {
                known.push(commit.id());
            }
        }
        known.sort();
        known.dedup();
        Ok(Completeness {
            repo: &self.repo,
            odb: self.repo.odb()?,
            known,
            complete_trees: HashSet::new(),
        })
    }
}

/// See [`Replica::completeness`].
pub struct Completeness<'r> {
    repo: &'r Repository,
    odb: Odb<'r>,
    /// Commits whose history is known complete: the refs' tips, and what
    /// this checker has proved since.
    known: Vec<Oid>,
    /// Trees already proved complete.
    complete_trees: HashSet<Oid>,
}

impl Completeness<'_> {
    /// Whether the object and everything reachable from it are present.
    pub fn is_complete(&mut self, id: &str) -> Result<bool, RepoError> {
        let oid = parse_id(id)?;
        missing_is_false(self.object(oid))
    }

    fn object(&mut self, mut oid: Oid) -> Result<bool, git2::Error> {
        // Tags may point at tags; follow the chain to the first non-tag.
        loop {
            let (_, kind) = self.odb.read_header(oid)?;
            match kind {
                ObjectType::Tag => oid = self.repo.find_tag(oid)?.target_id(),
                ObjectType::Commit => return self.commit_history(oid),
                ObjectType::Tree => return self.tree(oid, None),
                ObjectType::Blob => return Ok(true),
                _ => return Ok(false),
            }
        }
    }

    fn commit_history(&mut self, tip: Oid) -> Result<bool, git2::Error> {
        let mut walk = self.repo.revwalk()?;
        // Reverse topological order yields parents before children, so when a
        // commit comes up each parent is either already verified here or was
        // hidden, i.e. reachable from an existing ref.
        walk.set_sorting(Sort::TOPOLOGICAL | Sort::REVERSE)?;
        if self.known.binary_search(&tip).is_ok() {
            return Ok(true);
        }
        walk.push(tip)?;
        for &commit in &self.known {
            // A ref whose history cannot be walked just offers no shortcut.
            if let Err(e) = walk.hide(commit) {
                tracing::debug!(error = e.message(), "not using ref as a completeness base");
            }
        }
        for next in walk {
            let commit = self.repo.find_commit(next?)?;
            let base = match commit.parent_ids().next() {
                Some(parent) => Some(self.repo.find_commit(parent)?.tree_id()),
                None => None,
            };
            for parent in commit.parent_ids() {
                if !self.odb.exists(parent) {
                    return Ok(false);
                }
            }
            if !self.tree(commit.tree_id(), base)? {
                return Ok(false);
            }
        }
        if let Err(at) = self.known.binary_search(&tip) {
            self.known.insert(at, tip);
        }
        Ok(true)
    }

    /// `base`, when given, is a tree known to be complete; entries equal to
    /// its entries of the same name need no look.
    fn tree(&mut self, id: Oid, base: Option<Oid>) -> Result<bool, git2::Error> {
        if Some(id) == base || self.complete_trees.contains(&id) {
            return Ok(true);
        }
        let tree = self.repo.find_tree(id)?;
        let base_tree = match base {
            Some(b) => Some(self.repo.find_tree(b)?),
            None => None,
        };
        for entry in tree.iter() {
            let ok = match entry.kind() {
                Some(ObjectType::Tree) => {
                    let sub_base = same_name(base_tree.as_ref(), entry.name_bytes());
                    self.tree(entry.id(), sub_base)?
                }
                Some(ObjectType::Blob) => self.odb.exists(entry.id()),
                // Gitlinks name a commit in another repository (a submodule).
                Some(ObjectType::Commit) => true,
                _ => false,
            };
            if !ok {
                return Ok(false);
            }
        }
        self.complete_trees.insert(id);
        Ok(true)
    }
}

fn same_name(base: Option<&Tree<'_>>, name: &[u8]) -> Option<Oid> {
    let entry = base?.get_name_bytes(name)?;
    (entry.kind() == Some(ObjectType::Tree)).then(|| entry.id())
}

/// A missing object anywhere in the walk answers the question ("no") rather
/// than being an error.
fn missing_is_false(result: Result<bool, git2::Error>) -> Result<bool, RepoError> {
    match result {
        Ok(complete) => Ok(complete),
        Err(e) if e.code() == ErrorCode::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}
