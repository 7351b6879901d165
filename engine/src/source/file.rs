//! A local image file as a source: for tests, benchmarks and images already on the node.

use super::{ImageInfo, RangeSource};
use crate::error::{Error, ErrorKind, Result};
use async_trait::async_trait;
use bytes::Bytes;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;

pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileSource { path: path.into() }
    }

    fn info(&self) -> Result<ImageInfo> {
        let md = std::fs::metadata(&self.path).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound { ErrorKind::NotFound } else { ErrorKind::Transport };
            Error::with_source(kind, format!("image file {}", self.path.display()), e)
        })?;
        if !md.is_file() {
            return Err(Error::new(ErrorKind::InvalidInput, format!("{} is not a regular file", self.path.display())));
        }
        Ok(ImageInfo { size: md.len(), etag: Some(format!("{:x}-{:x}-{:x}", md.ino(), md.mtime(), md.mtime_nsec())), last_modified: None })
    }
}

#[async_trait]
impl RangeSource for FileSource {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    async fn probe(&self) -> Result<ImageInfo> {
        self.info()
    }

    async fn fetch(&self, offset: u64, len: u64, expect: &ImageInfo) -> Result<Bytes> {
        let path = self.path.clone();
        let now = self.info()?;
        expect.check_same(&now, &self.describe())?;
        tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&path).map_err(|e| Error::with_source(ErrorKind::Transport, path.display().to_string(), e))?;
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, offset)
                .map_err(|e| Error::with_source(ErrorKind::Protocol, format!("{} at offset {offset} length {len}", path.display()), e))?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::Transport, "file read task", e))?
    }
}
