//! Where the store's files live (`--blobs`): adapter versions and job checkpoints, folders of a
//! few files each, named by keys such as `adapters/intent/v3`.
//!
//! - `file:DIR` (the default, `DIR` being the tuning folder): the files are written in place. A
//!   group of servers shares the folder (a shared filesystem), so there is nothing to copy.
//! - `s3://bucket/prefix`: an S3-compatible object store, through the `object_store` crate, with
//!   the endpoint and credentials from the standard AWS environment variables. The tuning folder
//!   is then this server's cache: a folder is written there first, then each file is put under
//!   its key (one PUT replaces an object whole, so a reader sees the old object or the new, never
//!   half), and only then does the database record it. A server fetches a folder it lacks into a
//!   temporary folder beside the cache and renames it into place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt};

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`{0}` is neither `file:DIR` nor `s3://bucket/prefix`")]
    Location(String),
    #[error("the blob store's runtime did not start: {0}")]
    Runtime(std::io::Error),
    #[error("the blob store holds no files under `{0}`")]
    Missing(String),
}

/// Where blobs live (`--blobs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobLocation {
    /// A folder, shared by the servers of a group; the tuning folder when not given.
    File(PathBuf),
    /// `s3://bucket/prefix`.
    S3(String),
}

impl std::str::FromStr for BlobLocation {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Some(dir) = text.strip_prefix("file:") {
            Ok(BlobLocation::File(PathBuf::from(dir)))
        } else if text.starts_with("s3://") && text.len() > "s3://".len() {
            Ok(BlobLocation::S3(text.to_string()))
        } else {
            Err(BlobError::Location(text.to_string()).to_string())
        }
    }
}

/// The blob store of one server: remote objects (for `s3://`) and the local folder that holds
/// what this server wrote or fetched.
pub struct Blobs {
    remote: Option<Remote>,
}

struct Remote {
    objects: Arc<dyn ObjectStore>,
    /// The object store's client is asynchronous; store calls run on blocking threads.
    runtime: tokio::runtime::Runtime,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io { path: path.to_path_buf(), source }
}

impl Blobs {
    /// Files in place, in the folder itself.
    pub fn local() -> Self {
        Self { remote: None }
    }

    pub fn open(location: &BlobLocation) -> Result<Self, BlobError> {
        let BlobLocation::S3(url) = location else { return Ok(Self::local()) };
        let (bucket_url, prefix) = match url["s3://".len()..].split_once('/') {
            Some((bucket, prefix)) => (format!("s3://{bucket}"), prefix.trim_matches('/').to_string()),
            None => (url.clone(), String::new()),
        };
        let s3 = object_store::aws::AmazonS3Builder::from_env().with_url(bucket_url).build()?;
        let objects: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
        };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(BlobError::Runtime)?;
        Ok(Self { remote: Some(Remote { objects, runtime }) })
    }

    /// Puts every file of the folder `root/key` under `key/`. Nothing to do for files in place.
    pub fn publish(&self, root: &Path, key: &Path) -> Result<(), BlobError> {
        let Some(remote) = &self.remote else { return Ok(()) };
        let folder = root.join(key);
        for entry in std::fs::read_dir(&folder).map_err(io(&folder))? {
            let path = entry.map_err(io(&folder))?.path();
            if !path.is_file() {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let object = object_key(key, &name);
            remote.runtime.block_on(remote.objects.put(&object, bytes.into()))?;
        }
        Ok(())
    }

    /// Makes sure the folder `root/key` holds the files under `key/`, fetching them when this
    /// server lacks it. Folders are never changed once written, so one present is current.
    pub fn fetch(&self, root: &Path, key: &Path) -> Result<PathBuf, BlobError> {
        let folder = root.join(key);
        let Some(remote) = &self.remote else { return Ok(folder) };
        if folder.is_dir() {
            return Ok(folder);
        }
        let prefix = object_key(key, "");
        let objects: Vec<_> = remote.runtime.block_on(remote.objects.list(Some(&prefix)).try_collect())?;
        if objects.is_empty() {
            return Err(BlobError::Missing(key.display().to_string()));
        }
        let parent = folder.parent().unwrap_or(root);
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        let staging = tempfile::tempdir_in(parent).map_err(io(parent))?;
        for meta in objects {
            let bytes = remote.runtime.block_on(async { remote.objects.get(&meta.location).await?.bytes().await })?;
            let name = meta.location.filename().unwrap_or_default().to_string();
            let path = staging.path().join(&name);
            std::fs::write(&path, &bytes).map_err(io(&path))?;
        }
        let staged = staging.keep();
        if let Err(e) = std::fs::rename(&staged, &folder) {
            let _ = std::fs::remove_dir_all(&staged);
            // Another thread fetched it meanwhile: theirs is as good.
            if !folder.is_dir() {
                return Err(BlobError::Io { path: folder, source: e });
            }
        }
        Ok(folder)
    }

    /// Removes the folder `root/key` and, in an object store, every object under `key/`.
    pub fn remove(&self, root: &Path, key: &Path) -> Result<(), BlobError> {
        if let Some(remote) = &self.remote {
            let prefix = object_key(key, "");
            let objects: Vec<_> = remote.runtime.block_on(remote.objects.list(Some(&prefix)).try_collect())?;
            for meta in objects {
                remote.runtime.block_on(remote.objects.delete(&meta.location))?;
            }
        }
        remove_folder(&root.join(key))
    }

    /// Drops this server's cached copy of `root/key`; in place, the folder is the shared one and
    /// stays (whoever deleted its record removed it).
    pub fn forget(&self, root: &Path, key: &Path) -> Result<(), BlobError> {
        match self.remote {
            Some(_) => remove_folder(&root.join(key)),
            None => Ok(()),
        }
    }

    /// Puts one whole object under `key` (an uploaded file); `false` when the files are in
    /// place and the caller keeps the bytes itself.
    pub fn put_object(&self, key: &str, bytes: &[u8]) -> Result<bool, BlobError> {
        let Some(remote) = &self.remote else { return Ok(false) };
        remote.runtime.block_on(remote.objects.put(&Key::from(key), bytes.to_vec().into()))?;
        Ok(true)
    }

    /// The object under `key`.
    pub fn get_object(&self, key: &str) -> Result<Vec<u8>, BlobError> {
        let Some(remote) = &self.remote else { return Err(BlobError::Missing(key.to_string())) };
        let bytes = remote.runtime.block_on(async { remote.objects.get(&Key::from(key)).await?.bytes().await })?;
        Ok(bytes.into())
    }
}

fn remove_folder(folder: &Path) -> Result<(), BlobError> {
    match std::fs::remove_dir_all(folder) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BlobError::Io { path: folder.to_path_buf(), source: e }),
        _ => Ok(()),
    }
}

fn object_key(folder: &Path, file: &str) -> Key {
    let mut parts: Vec<String> = folder.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    if !file.is_empty() {
        parts.push(file.to_string());
    }
    Key::from_iter(parts)
}
