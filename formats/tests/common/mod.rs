//! Blob openers shared by the format suites: local files, and in-memory blobs for hostile
//! variants of real images.
#![allow(dead_code)]

use async_trait::async_trait;
use lazy_image_engine::{ErrorKind, FakeSource, FileSource, ImageConfig, LazyImage, Result};
use lazy_image_formats::BlobOpener;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Local files as blobs, each cached under `cache`; counts the blobs it opened.
pub struct Files {
    pub cache: PathBuf,
    pub opened: Mutex<Vec<String>>,
}

impl Files {
    pub fn new(cache: &Path) -> Files {
        Files { cache: cache.to_path_buf(), opened: Mutex::default() }
    }
}

#[async_trait]
impl BlobOpener for Files {
    async fn open(&self, url: &str) -> Result<LazyImage> {
        self.opened.lock().unwrap().push(url.to_string());
        let src = FileSource::open(Path::new(url))?;
        LazyImage::open(Arc::new(src), ImageConfig::new(&self.cache)).await
    }
}

/// In-memory blobs by name, each cached under the directory beside them.
pub struct Mem(pub HashMap<String, Vec<u8>>, pub PathBuf);

#[async_trait]
impl BlobOpener for Mem {
    async fn open(&self, url: &str) -> Result<LazyImage> {
        let data = self.0.get(url).cloned().ok_or_else(|| lazy_image_engine::Error::new(ErrorKind::NotFound, url.to_string()))?;
        LazyImage::open(Arc::new(FakeSource::new(data)), ImageConfig::new(self.1.join(url.replace('/', "_")))).await
    }
}

/// True when every tool is on the PATH. In CI a missing one fails the test instead of skipping
/// it; `package` says where they come from.
pub fn tools_present(tools: &[&str], package: &str) -> bool {
    let ok = tools
        .iter()
        .all(|t| std::process::Command::new("sh").arg("-c").arg(format!("command -v {t}")).output().is_ok_and(|o| o.status.success()));
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "CI must provide {tools:?} ({package})");
        eprintln!("skipping: one of {tools:?} is missing ({package})");
    }
    ok
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Reads the whole view in odd-sized pieces (crossing clusters, blocks and extents) and then,
/// warm, through the plan path, and compares every byte with `want`.
pub async fn assert_view_is(view: &lazy_image_engine::View, want: &[u8], what: &str) {
    use lazy_image_engine::ReadPlan;
    assert_eq!(view.size(), want.len() as u64, "{what}: device size");
    let mut got = vec![0u8; want.len()];
    let piece = 48 << 10 | 512;
    for at in (0..want.len()).step_by(piece) {
        let end = (at + piece).min(want.len());
        let n = view.read_into(at as u64, &mut got[at..end]).await.unwrap();
        assert_eq!(n, end - at);
    }
    assert!(got == want, "{what}: the device's bytes differ from the expected image");
    let mut buf = vec![0u8; 4096];
    for at in (0..want.len()).step_by(61 * 4096) {
        let n = match view.plan_read(at as u64, &mut buf) {
            ReadPlan::Copied(n) => n,
            ReadPlan::File { file, offset, len, .. } => {
                let f = std::fs::File::from(file.try_clone_to_owned().unwrap());
                std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf[..len], offset).unwrap();
                len
            }
            ReadPlan::Miss => view.read_into(at as u64, &mut buf).await.unwrap(),
        };
        assert_eq!(&buf[..n], &want[at..at + n], "{what}: planned read at {at}");
    }
    // Ragged reads on the caller's thread (large ones of compressed blocks decoded there,
    // partly covered blocks kept for the next read), where they need no wait.
    let mut buf = vec![0u8; 70_000];
    for at in (123..want.len()).step_by(37 * 4096 + 123) {
        let len = buf.len().min(want.len() - at);
        let n = match view.read_cached_into(at as u64, &mut buf[..len]).unwrap() {
            Some(n) => n,
            None => view.read_into(at as u64, &mut buf[..len]).await.unwrap(),
        };
        assert_eq!(n, len);
        assert_eq!(&buf[..n], &want[at..at + n], "{what}: read on the caller's thread at {at}");
    }
}
