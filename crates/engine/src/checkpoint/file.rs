//! Checkpoint store in a local file, for `monsoon run`.
//!
//! Writes go to a temporary file that is fsynced and renamed over the old one, then the
//! directory is fsynced: a crash at any moment leaves the previous or the new checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Checkpoint, CheckpointStore, Error};

/// A checkpoint kept at `<dir>/<pipeline>.checkpoint.json`.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// Store for `pipeline` under `dir` (created when missing).
    ///
    /// # Errors
    /// [`Error::Io`] if the directory cannot be created.
    pub fn new(dir: &Path, pipeline: &str) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            op: "create directory for",
            location: dir.display().to_string(),
            source,
        })?;
        Ok(Self {
            path: dir.join(format!("{pipeline}.checkpoint.json")),
        })
    }

    /// Path of the checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            // Make the rename itself durable.
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl CheckpointStore for FileStore {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    async fn load(&self) -> Result<Option<Checkpoint>, Error> {
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::Io {
                    op: "read",
                    location: self.location(),
                    source,
                })
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Corrupt {
                location: self.location(),
                reason: e.to_string(),
            })
    }

    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), Error> {
        let bytes = serde_json::to_vec_pretty(checkpoint).map_err(|e| Error::Corrupt {
            location: self.location(),
            reason: e.to_string(),
        })?;
        let path = self.path.clone();
        let location = self.location();
        tokio::task::spawn_blocking(move || Self::write_atomically(&path, &bytes))
            .await
            .map_err(|e| Error::Io {
                op: "write",
                location: location.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| Error::Io {
                op: "write",
                location,
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn save_then_load_returns_the_same_checkpoint_and_missing_is_none() {
        let dir = std::env::temp_dir().join(format!("monsoon-file-store-{}", std::process::id()));
        let store = FileStore::new(&dir, "shop").expect("store");
        assert_eq!(store.load().await.expect("load"), None);
        let mut cp = Checkpoint::new("shop");
        cp.snapshot.done = true;
        store.save(&cp).await.expect("save");
        cp.snapshot.collections.insert("a.b".into(), Default::default());
        store.save(&cp).await.expect("save again");
        assert_eq!(store.load().await.expect("load"), Some(cp));
        assert!(!store.path().with_extension("json.tmp").exists());
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn corrupt_file_is_reported_not_ignored() {
        let dir = std::env::temp_dir().join(format!("monsoon-file-corrupt-{}", std::process::id()));
        let store = FileStore::new(&dir, "shop").expect("store");
        std::fs::write(store.path(), b"{not json").expect("write");
        assert!(matches!(store.load().await, Err(Error::Corrupt { .. })));
        std::fs::remove_dir_all(dir).ok();
    }
}
