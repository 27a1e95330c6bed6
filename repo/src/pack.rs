//! Packs: how objects travel between nodes.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use git2::{Buf, ObjectType, Oid, PackBuilder, Revwalk};

use crate::replica::parse_id;
use crate::{Replica, RepoError};

/// "PACK", version, object count, then a 20-byte SHA-1 trailer.
const EMPTY_PACK_LEN: usize = 12 + 20;

impl Replica {
    /// Builds a pack with everything reachable from `wants` that is not
    /// reachable from those `haves` this repository knows (unknown haves are
    /// ignored). Wants may be commits, annotated tags, trees or blobs.
    pub fn build_pack(&self, wants: &[String], haves: &[String]) -> Result<Vec<u8>, RepoError> {
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
        let mut buf = Buf::new();
        builder.write_buf(&mut buf)?;
        tracing::debug!(
            objects = builder.object_count(),
            bytes = buf.len(),
            "pack built"
        );
        Ok(buf.to_vec())
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

    /// Writes pack bytes into the object database, indexed. libgit2's pack
    /// writer streams into a temporary file and renames it into objects/pack
    /// only on commit, so a failure or a crash midway leaves no bad pack.
    pub fn index_pack(&self, pack: &[u8]) -> Result<(), RepoError> {
        if is_empty_pack(pack) {
            // libgit2 would write a pack and index holding nothing; skip the clutter.
            return Ok(());
        }
        let odb = self.repo.odb()?;
        let mut writer = odb.packwriter()?;
        // The io::Write impl hides libgit2's reason; it is still in the
        // thread's last-error slot, so fetch it from there.
        if writer.write_all(pack).is_err() {
            let reason = git2::Error::last_error(-1).map(|e| e.message().to_string());
            return Err(RepoError::BadPack(
                reason.unwrap_or_else(|| "unreadable data".to_string()),
            ));
        }
        writer
            .commit()
            .map_err(|e| RepoError::BadPack(e.message().to_string()))?;
        drop(writer);
        self.sync_pack(pack);
        tracing::debug!(bytes = pack.len(), "pack indexed");
        Ok(())
    }

    /// libgit2 does not fsync by default, but a node may acknowledge objects
    /// as stored right after indexing them. The pack is named after its
    /// trailer checksum (unless it was thin and got completed, in which case
    /// we cannot name it and only the directory is synced).
    fn sync_pack(&self, pack: &[u8]) {
        let dir = self.repo.path().join("objects").join("pack");
        let trailer: String = pack[pack.len() - 20..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        for ext in ["pack", "idx"] {
            let file = dir.join(format!("pack-{trailer}.{ext}"));
            if let Err(e) = fsync(&file) {
                tracing::debug!(file = %file.display(), error = %e, "pack not synced");
            }
        }
        if let Err(e) = fsync(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "pack directory not synced");
        }
    }
}

fn fsync(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

fn is_empty_pack(pack: &[u8]) -> bool {
    pack.is_empty()
        || (pack.len() == EMPTY_PACK_LEN
            && pack.starts_with(b"PACK")
            && pack[8..12] == [0, 0, 0, 0])
}
