//! Packs: how objects travel between nodes.

use std::io::Write;

use git2::{ObjectType, Oid, PackBuilder, Revwalk};

use crate::replica::parse_id;
use crate::{Replica, RepoError};

/// "PACK", version, object count, then a 20-byte SHA-1 trailer.
const EMPTY_PACK_LEN: usize = 12 + 20;

impl Replica {
    /// Builds a pack with everything reachable from `wants` that is not
    /// reachable from those `haves` this repository knows (unknown haves are
    /// ignored). Wants may be commits, annotated tags, trees or blobs.
    pub fn build_pack(&self, wants: &[String], haves: &[String]) -> Result<Vec<u8>, RepoError> {
        let mut pack = Vec::new();
        self.write_pack(wants, haves, |chunk| {
            pack.extend_from_slice(chunk);
            true
        })?;
        Ok(pack)
    }

    /// Like [`Replica::build_pack`], handing the pack to `sink` piece by
    /// piece as libgit2 writes it, so a large pack is never held whole.
    /// `sink` returns false to stop early (the receiver went away).
    pub fn write_pack(
        &self,
        wants: &[String],
        haves: &[String],
        mut sink: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), RepoError> {
        let mut builder = self.repo.packbuilder()?;
        let mut walk = self.repo.revwalk()?;
        for want in wants {
            let oid = parse_id(want)?;
            if !self.repo.odb()?.exists(oid) {
                return Err(RepoError::MissingObject(oid.to_string()));
            }
            self.add_want(&mut builder, &mut walk, oid)?;
        }
        for have in haves {
            let oid = parse_id(have)?;
            // A have that is not a commit-ish here cannot prune the walk.
            if let Some(commit) = self.peel_commit(&oid.to_string()) {
                walk.hide(commit)?;
            }
        }
        // insert_walk also leaves out the trees and blobs of the hidden tips.
        builder.insert_walk(&mut walk)?;
        let objects = builder.object_count();
        let mut stopped = false;
        let result = builder.foreach(|chunk| {
            stopped = !sink(chunk);
            !stopped
        });
        match result {
            Err(_) if stopped => Err(RepoError::BadPack("the receiver went away".into())),
            other => other.map_err(RepoError::from),
        }?;
        tracing::debug!(objects, "pack written");
        Ok(())
    }

    fn add_want(
        &self,
        builder: &mut PackBuilder<'_>,
        walk: &mut Revwalk<'_>,
        mut oid: Oid,
    ) -> Result<(), RepoError> {
        loop {
            let (_, kind) = self.repo.odb()?.read_header(oid)?;
            match kind {
                ObjectType::Tag => {
                    builder.insert_object(oid, None)?;
                    oid = self.repo.find_tag(oid)?.target_id();
                }
                ObjectType::Commit => return Ok(walk.push(oid)?),
                ObjectType::Tree => return Ok(builder.insert_tree(oid)?),
                _ => return Ok(builder.insert_object(oid, None)?),
            }
        }
    }

    /// Writes pack bytes into the object database, indexed.
    pub fn index_pack(&self, pack: &[u8]) -> Result<(), RepoError> {
        self.receive_pack(std::iter::once(Ok::<_, String>(pack.to_vec())))
            .map(drop)
    }

    /// Indexes a pack arriving in pieces into the object database; returns
    /// its size. libgit2's pack writer streams into a temporary file and
    /// renames it into objects/pack only on commit, so a failure, an `Err`
    /// piece (the stream broke) or a crash midway leaves no pack behind.
    pub fn receive_pack<E: std::fmt::Display>(
        &self,
        pieces: impl IntoIterator<Item = Result<Vec<u8>, E>>,
    ) -> Result<u64, RepoError> {
        crate::leftovers::pack_dir_here(self.repo.path())?;
        let odb = self.repo.odb()?;
        let mut writer = odb.packwriter()?;
        let mut len: u64 = 0;
        let mut header = Vec::with_capacity(12);
        for piece in pieces {
            let piece =
                piece.map_err(|e| RepoError::BadPack(format!("transfer broke off: {e}")))?;
            if header.len() < 12 {
                let take = (12 - header.len()).min(piece.len());
                header.extend_from_slice(&piece[..take]);
            }
            len += piece.len() as u64;
            // The io::Write impl hides libgit2's reason; it is still in the
            // thread's last-error slot, so fetch it from there.
            if writer.write_all(&piece).is_err() {
                let reason = git2::Error::last_error(-1).map(|e| e.message().to_string());
                return Err(RepoError::BadPack(
                    reason.unwrap_or_else(|| "unreadable data".to_string()),
                ));
            }
        }
        if is_empty_pack(len, &header) {
            // libgit2 would write a pack and index holding nothing; skip the clutter.
            return Ok(len);
        }
        writer
            .commit()
            .map_err(|e| RepoError::BadPack(e.message().to_string()))?;
        drop(writer);
        // libgit2 has fsynced the pack, its index and objects/pack itself
        // (fsync is on for every process that opens a Replica: `crate::durable`).
        tracing::debug!(bytes = len, "pack indexed");
        Ok(len)
    }
}

fn is_empty_pack(len: u64, header: &[u8]) -> bool {
    len == 0
        || (len == EMPTY_PACK_LEN as u64
            && header.starts_with(b"PACK")
            && header.get(8..12) == Some(&[0, 0, 0, 0][..]))
}
