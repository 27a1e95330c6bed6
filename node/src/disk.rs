//! The node's sled database, made durable for real.
//!
//! sled's `flush` writes its buffers with `sync_file_range`, which neither
//! flushes the disk's cache nor records a grown file's size, and writes the
//! files it keeps for large values (`blobs/`) with no sync at all. Raft needs
//! an acknowledged write to survive a power cut, so [`Disk::sync`] follows
//! sled's flush with an fdatasync of its log file and an fsync of every blob
//! file written since the last sync (and of their directory).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, Context};

pub struct Disk {
    db: sled::Db,
    dir: PathBuf,
    /// sled's log, where every tree of the database lives.
    log: File,
    /// Blob files are named by the log sequence number that wrote them; the
    /// highest one already synced.
    blobs_synced: Mutex<u64>,
}

impl Disk {
    pub fn open(dir: &Path) -> anyhow::Result<Disk> {
        let db = sled::Config::new().path(dir).open().map_err(|e| match e {
            sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("lock") =>
            {
                anyhow!("{} is in use by another piehole node", dir.display())
            }
            e => anyhow!("cannot open {}: {e}", dir.display()),
        })?;
        let log_path = dir.join("db");
        let log =
            File::open(&log_path).with_context(|| format!("cannot open {}", log_path.display()))?;
        let disk = Disk {
            db,
            dir: dir.to_path_buf(),
            log,
            blobs_synced: Mutex::new(0),
        };
        // The files sled created at first open are entries of its directory.
        fsync_dir(dir)?;
        disk.sync()?;
        Ok(disk)
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Everything written so far is on stable storage when this returns.
    pub fn sync(&self) -> anyhow::Result<()> {
        self.db.flush()?;
        self.log.sync_data().context("fdatasync of sled's log")?;
        self.sync_new_blobs()
    }

    fn sync_new_blobs(&self) -> anyhow::Result<()> {
        let blobs = self.dir.join("blobs");
        let entries = match std::fs::read_dir(&blobs) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).context("reading sled's blobs directory"),
        };
        let mut synced = self.blobs_synced.lock().unwrap_or_else(|e| e.into_inner());
        let mut newest = *synced;
        for entry in entries {
            let entry = entry?;
            let Some(lsn) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if lsn > *synced {
                File::open(entry.path())?.sync_all()?;
                newest = newest.max(lsn);
            }
        }
        if newest > *synced {
            fsync_dir(&blobs)?;
            *synced = newest;
        }
        Ok(())
    }
}

fn fsync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync of {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_values_land_in_blob_files_that_sync_covers() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::open(&dir.path().join("db")).unwrap();
        let tree = disk.db().open_tree("t").unwrap();
        tree.insert(b"big", vec![7u8; 400 * 1024]).unwrap();
        disk.sync().unwrap();
        // sled chose a blob file for it, and sync saw it.
        assert!(*disk.blobs_synced.lock().unwrap() > 0);
        drop(tree);
        drop(disk);
        let disk = Disk::open(&dir.path().join("db")).unwrap();
        let tree = disk.db().open_tree("t").unwrap();
        assert_eq!(tree.get(b"big").unwrap().unwrap().len(), 400 * 1024);
    }
}
