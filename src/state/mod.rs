//! The state layer: hookd's one sled database and the per-partition protocol every store in
//! it follows.
//!
//! Guarantees:
//! - [`StateDb::open`] waits up to 5 s for the directory's lock (an instance in this process
//!   may still be closing), never wipes a locked or unwritable directory, and wipes an
//!   unreadable (corrupt) one: everything in it is rebuilt by replaying Kafka from the
//!   committed offsets (DESIGN section 2).
//! - [`Partitions`] keeps, in a store's own tree, each input partition's checkpoint (highest
//!   offset applied) and settled position (every offset below it finished), with one encoding,
//!   so that a store's data and its partition bookkeeping change in one atomic sled batch.
//!   The committed position of a partition is its store's low-watermark (smallest offset
//!   whose work is unfinished) or else one past the checkpoint ([`Partitions::position`]).
//!
//! The retry store (`deliver::park`) and the window store (`window::store`) are its users;
//! endpoint state keeps its own trees in the same database.

mod partition;

pub use partition::{Moves, Partitions};

use std::io::ErrorKind;
use std::path::Path;

/// The sled database under `state.path`. Cheap to clone.
#[derive(Clone)]
pub struct StateDb {
    db: sled::Db,
}

impl StateDb {
    /// Opens (or creates) the database in `dir` with sled's page cache limited to
    /// `cache_bytes` (`state.cache_mb`). Returns whether an unreadable store was wiped.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<(Self, bool), sled::Error> {
        let config = || sled::Config::new().path(dir).cache_capacity(cache_bytes).mode(sled::Mode::HighThroughput);
        for _ in 0..50 {
            match config().open() {
                Ok(db) => return Ok((Self { db }, false)),
                // sled reports a held lock as `Other` with this text (sled 0.34 `config.rs`).
                Err(sled::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(100))
                }
                Err(sled::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem | ErrorKind::StorageFull) =>
                {
                    return Err(sled::Error::Io(e));
                }
                Err(error) => {
                    tracing::warn!(%error, path = %dir.display(), "State store unreadable; wiping it and replaying from Kafka.");
                    let _ = std::fs::remove_dir_all(dir);
                    return Ok((Self { db: config().open()? }, true));
                }
            }
        }
        let msg = format!("state directory {} is locked by another process (is another hookd using the same state.path?)", dir.display());
        Err(sled::Error::Io(std::io::Error::new(ErrorKind::WouldBlock, msg)))
    }

    /// [`Self::open`] with the default cache size (`state.cache_mb`).
    pub fn open_default(dir: &Path) -> Result<(Self, bool), sled::Error> {
        Self::open(dir, crate::config::StateConfig::default().cache_mb << 20)
    }

    pub fn tree(&self, name: &str) -> Result<sled::Tree, sled::Error> {
        self.db.open_tree(name)
    }

    /// Writes everything to disk: before a position that relies on it is stored.
    pub async fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush_async().await.map(|_| ())
    }

    /// [`Self::flush`], blocking: off the async runtime only.
    pub fn flush_blocking(&self) -> Result<(), sled::Error> {
        self.db.flush().map(|_| ())
    }

    /// The database itself, for stores that keep trees of their own (endpoint state).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopens_keeps_data_and_wipes_garbage_never_a_locked_store() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (db, wiped) = StateDb::open_default(dir.path()).unwrap();
            assert!(!wiped);
            db.tree("t").unwrap().insert(b"k", b"v").unwrap();
            db.flush_blocking().unwrap();
            let locked = StateDb::open(dir.path(), 1 << 20);
            let error = locked.err().expect("a second open of a held store fails").to_string();
            assert!(error.contains("locked by another process"), "{error}");
        }
        let (db, wiped) = StateDb::open_default(dir.path()).unwrap();
        assert!(!wiped, "a locked store was not wiped");
        assert_eq!(db.tree("t").unwrap().get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        drop(db);

        let bad = tempfile::tempdir().unwrap();
        std::fs::write(bad.path().join("conf"), b"\xff\xfe garbage").unwrap();
        std::fs::write(bad.path().join("db"), b"not a sled file at all").unwrap();
        let (db, wiped) = StateDb::open_default(bad.path()).unwrap();
        assert!(wiped, "an unreadable store is wiped");
        assert!(db.tree("t").unwrap().is_empty());
    }
}
