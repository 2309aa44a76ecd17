//! Content-addressed blobs (weights, momentum, pseudo-gradients, data units, the tokenizer), named by the
//! blake3 hash of their bytes, behind `object_store`: a local directory by default, or any store
//! `object_store` parses from a URL (`s3://bucket/prefix`, `file:///...`, `memory://`).
//!
//! Durability: on a local directory every new blob is fsynced (file and directory) before `put` returns,
//! so a round row that names a blob never outlives the blob across a crash. Reads verify the hash.

use agora_protocol::{hash_bytes, Hash32};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use object_store::{local::LocalFileSystem, path::Path as StorePath, ObjectStore, PutPayload};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    /// Set for local directories: where to fsync.
    local_root: Option<PathBuf>,
    description: String,
}

impl BlobStore {
    /// A local directory (created if needed) or a URL `object_store` understands.
    pub fn open(location: &str) -> Result<BlobStore> {
        if location.contains("://") && !location.starts_with("file://") {
            let url =
                url::Url::parse(location).with_context(|| format!("blob store URL {location:?} does not parse"))?;
            let (store, prefix) = object_store::parse_url(&url)
                .with_context(|| format!("blob store {location:?}: unsupported URL (file://, s3://, memory://)"))?;
            return Ok(BlobStore { store: Arc::from(store), prefix, local_root: None, description: location.into() });
        }
        let dir = PathBuf::from(location.strip_prefix("file://").unwrap_or(location));
        Self::local(&dir)
    }

    pub fn local(dir: &Path) -> Result<BlobStore> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create blob directory", dir.display()))?;
        let root = std::fs::canonicalize(dir)?;
        let store = LocalFileSystem::new_with_prefix(&root)
            .with_context(|| format!("{}: cannot open as a blob store", root.display()))?;
        Ok(BlobStore {
            store: Arc::new(store),
            prefix: StorePath::default(),
            local_root: Some(root.clone()),
            description: root.display().to_string(),
        })
    }

    pub fn describe(&self) -> &str {
        &self.description
    }

    fn path(&self, hash: &Hash32) -> StorePath {
        let hex = hash.hex();
        let mut parts: Vec<String> = self.prefix.parts().map(|p| p.as_ref().to_string()).collect();
        parts.push(hex[..2].to_string());
        parts.push(hex);
        StorePath::from_iter(parts)
    }

    /// Stores `bytes` (if not already there) and returns their hash. Durable when it returns.
    pub async fn put(&self, bytes: Bytes) -> Result<Hash32> {
        let hash = hash_bytes(&bytes);
        let path = self.path(&hash);
        if self.store.head(&path).await.is_ok() {
            return Ok(hash);
        }
        self.store
            .put(&path, PutPayload::from_bytes(bytes))
            .await
            .with_context(|| format!("blob store {}: cannot write blob {hash}", self.description))?;
        if let Some(root) = &self.local_root {
            let file = root.join(path.as_ref());
            let dir = file.parent().expect("blob files live in a fan-out directory").to_path_buf();
            tokio::task::spawn_blocking(move || -> Result<()> {
                std::fs::File::open(&file)?.sync_all()?;
                std::fs::File::open(&dir)?.sync_all()?;
                if let Some(parent) = dir.parent() {
                    std::fs::File::open(parent)?.sync_all()?;
                }
                Ok(())
            })
            .await?
            .with_context(|| format!("blob store {}: cannot fsync blob {hash}", self.description))?;
        }
        Ok(hash)
    }

    /// Reads a blob and checks that its bytes hash to its name.
    pub async fn get(&self, hash: &Hash32) -> Result<Bytes> {
        let bytes = self
            .store
            .get(&self.path(hash))
            .await
            .with_context(|| format!("blob {hash} not found in {}", self.description))?
            .bytes()
            .await
            .with_context(|| format!("blob {hash}: read failed in {}", self.description))?;
        if hash_bytes(&bytes) != *hash {
            bail!("blob {hash} in {} is corrupt: its bytes hash to {}", self.description, hash_bytes(&bytes));
        }
        Ok(bytes)
    }

    /// Reads part of a blob. Unlike [`Self::get`] it cannot check the bytes against the blob's name; the
    /// coordinator uses it only for payloads it fully validated before storing them (judging a round one
    /// tensor at a time), and [`Self::get`] of the same blob in the same judgement checks the whole.
    pub async fn get_range(&self, hash: &Hash32, range: std::ops::Range<usize>) -> Result<Bytes> {
        self.store
            .get_range(&self.path(hash), range.start as u64..range.end as u64)
            .await
            .with_context(|| format!("blob {hash}: cannot read bytes {range:?} in {}", self.description))
    }

    pub async fn contains(&self, hash: &Hash32) -> bool {
        self.store.head(&self.path(hash)).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_blobs_are_content_addressed_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().to_str().unwrap()).unwrap();
        let hash = store.put(Bytes::from_static(b"weights")).await.unwrap();
        assert_eq!(hash, hash_bytes(b"weights"));
        assert_eq!(store.put(Bytes::from_static(b"weights")).await.unwrap(), hash, "idempotent");
        assert_eq!(&store.get(&hash).await.unwrap()[..], b"weights");
        assert!(store.contains(&hash).await);
        assert!(!store.contains(&hash_bytes(b"other")).await);
        assert!(store.get(&hash_bytes(b"other")).await.is_err());
        // A blob whose bytes changed on disk is refused, not served.
        let file = dir.path().join(&hash.hex()[..2]).join(hash.hex());
        std::fs::write(&file, b"tampered").unwrap();
        let err = format!("{:#}", store.get(&hash).await.unwrap_err());
        assert!(err.contains("corrupt"), "{err}");
    }

    #[tokio::test]
    async fn object_store_urls_work() {
        let store = BlobStore::open("memory:///agora").unwrap();
        let hash = store.put(Bytes::from_static(b"delta")).await.unwrap();
        assert_eq!(&store.get(&hash).await.unwrap()[..], b"delta");
        assert!(BlobStore::open("nonsense://x").is_err());
    }
}
