//! OverlayBD images (containerd/overlaybd), read-only: a stack of LSMT layer files, each
//! optionally ZFile-compressed, each the lazy cache of its own blob. The merged index says for
//! every sector which layer serves it (or that it reads as zeros); a read becomes reads of the
//! layers' files, decompressed where a layer is a ZFile.
//!
//! Layers are untrusted input: headers, indexes and tables are checked against their files and
//! bounded before anything is allocated for them, and what this reader does not support
//! (writable layers, index files, dictionaries, MINI_LZO) is refused with a precise error.

pub mod lsmt;
pub mod zfile;

use crate::{corrupt, refuse};
use async_trait::async_trait;
use bytes::Bytes;
use lazy_image_engine::{BlockView, Condition, LazyImage, ReadPlan, Result, StatsSnapshot, View};
use lsmt::{Extent, SECTOR};
use std::sync::Arc;
use zfile::ZFile;

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// Fills `buf` from `r` up to its end; fewer bytes only at the end of `r`.
pub(crate) fn read_full(r: &mut dyn std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// True when a blob's first bytes are an OverlayBD layer's (LSMT, or a ZFile holding one).
pub fn has_magic(head: &[u8]) -> bool {
    lsmt::has_magic(head) || zfile::has_magic(head)
}

/// The bytes of one layer file: the blob itself, or the file a ZFile blob compresses.
enum LayerFile {
    Plain(LazyImage),
    Compressed(ZFile),
}

impl LayerFile {
    fn size(&self) -> u64 {
        match self {
            LayerFile::Plain(b) => b.size(),
            LayerFile::Compressed(z) => z.size(),
        }
    }

    async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        match self {
            LayerFile::Plain(b) => b.read_into(offset, buf).await,
            LayerFile::Compressed(z) => z.read_into(offset, buf).await,
        }
    }

    async fn read(&self, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len as usize];
        let got = self.read_into(offset, &mut out).await?;
        if got as u64 != len {
            return Err(corrupt(what, format!("{len} bytes at {offset} are past the end of the layer")));
        }
        Ok(out)
    }
}

/// Reads of compressed extents at least this large are decoded on the caller's thread when
/// their compressed bytes are in memory (a sequential reader's, with no hop to the runtime);
/// smaller ones always go to `read_into`: decoded on a queue thread, warm random 4 KiB reads ran
/// at a quarter of their rate through the runtime (bench/README.md).
const DECODE_HERE_MIN: usize = 64 << 10;

/// All of `buf` from compressed layer `z` at `offset`, decoded on the caller's thread, when the
/// read is large enough and its compressed bytes are in memory; `None`: use `read_into`.
fn decode_here(z: &ZFile, offset: u64, buf: &mut [u8]) -> Result<Option<usize>> {
    if buf.len() < DECODE_HERE_MIN {
        return Ok(None);
    }
    Ok(z.read_resident(offset, buf)?.filter(|&n| n == buf.len()))
}

struct StackLayer {
    blob: LazyImage,
    file: LayerFile,
    what: String,
}

/// A stack of OverlayBD layers as one read-only device.
pub struct Stack {
    layers: Vec<StackLayer>,
    extents: Vec<Extent>,
    size: u64,
}

impl Stack {
    /// Opens the layers, bottom first, each `(where it is, its blob)`.
    pub async fn open(blobs: Vec<(String, LazyImage)>) -> Result<Stack> {
        if blobs.is_empty() || blobs.len() > lsmt::MAX_LAYERS {
            return Err(refuse("OverlayBD image", format!("a stack of {} layers (1 to {} are served)", blobs.len(), lsmt::MAX_LAYERS)));
        }
        let mut layers = Vec::with_capacity(blobs.len());
        let mut indexes = Vec::with_capacity(blobs.len());
        let mut heads: Vec<lsmt::Layer> = Vec::with_capacity(blobs.len());
        for (url, blob) in blobs {
            let what = format!("OverlayBD layer {url}");
            let magic = blob.read(0, blob.size().min(24)).await?;
            let file = if zfile::has_magic(&magic) {
                LayerFile::Compressed(ZFile::open(blob.clone(), &what).await?)
            } else if lsmt::has_magic(&magic) {
                LayerFile::Plain(blob.clone())
            } else {
                return Err(refuse(&what, "not an OverlayBD layer (neither LSMT nor ZFile magic)"));
            };
            let size = file.size();
            if size < 2 * lsmt::SPACE {
                return Err(refuse(&what, "too short for an LSMT layer (a ZFile must hold one)"));
            }
            let head = file.read(0, lsmt::SPACE, &what).await?;
            let tail = file.read(size - lsmt::SPACE, lsmt::SPACE, &what).await?;
            let l = lsmt::parse_layer(&head, &tail, size, &what)?;
            let raw = file.read(l.index_offset, l.index_records * 16, &what).await?;
            indexes.push(lsmt::parse_index(&raw, &l, &what)?);
            // A layer that names its parent holds only what differs from it: served on
            // anything else, it would show a mix of two images.
            match heads.last() {
                Some(below) if !l.parent_uuid.is_empty() && !below.uuid.is_empty() && l.parent_uuid != below.uuid => {
                    return Err(refuse(
                        &what,
                        format!("its parent is layer {} but the layer beneath it is {} (layers out of order?)", l.parent_uuid, below.uuid),
                    ));
                }
                None if !l.parent_uuid.is_empty() => {
                    return Err(refuse(
                        &what,
                        format!("it stacks on layer {}, which is not given beneath it (layers out of order?)", l.parent_uuid),
                    ));
                }
                _ => {}
            }
            heads.push(l);
            layers.push(StackLayer { blob, file, what });
        }
        let size = heads.iter().rev().map(|h| h.virtual_size).find(|&s| s > 0).unwrap_or(0);
        if size == 0 {
            return Err(corrupt("OverlayBD image", "no layer gives the device's size"));
        }
        let extents = lsmt::merge(&indexes);
        Ok(Stack { layers, extents, size })
    }

    /// Index of the first extent ending after sector `s`.
    fn first_after(&self, s: u64) -> usize {
        self.extents.partition_point(|e| e.end() <= s)
    }

    /// What serves all of `[offset, offset + len)` if one thing does: an extent, or nothing
    /// (zeros).
    fn single(&self, offset: u64, len: u64) -> Option<Option<Extent>> {
        let (first, last) = (offset / SECTOR, (offset + len - 1) / SECTOR);
        let i = self.first_after(first);
        match self.extents.get(i) {
            Some(e) if e.offset <= first => (e.end() > last).then_some(Some(*e)),
            Some(e) if e.offset <= last => None,
            _ => Some(None),
        }
    }

    fn clip(&self, offset: u64, len: usize) -> usize {
        len.min(self.size.saturating_sub(offset) as usize)
    }
}

/// Where byte `offset` of extent `e` is in its layer's file.
fn file_offset(e: &Extent, offset: u64) -> u64 {
    e.moffset * SECTOR + (offset - e.offset * SECTOR)
}

#[async_trait]
impl BlockView for Stack {
    fn size(&self) -> u64 {
        self.size
    }

    fn chunk_size(&self) -> u64 {
        self.layers[self.layers.len() - 1].blob.chunk_size()
    }

    fn plan_read(&self, offset: u64, buf: &mut [u8]) -> ReadPlan<'_> {
        let len = self.clip(offset, buf.len());
        if len == 0 {
            return ReadPlan::Copied(0);
        }
        match self.single(offset, len as u64) {
            Some(None) => {
                buf[..len].fill(0);
                ReadPlan::Copied(len)
            }
            Some(Some(e)) if e.zeroed => {
                buf[..len].fill(0);
                ReadPlan::Copied(len)
            }
            Some(Some(e)) => match &self.layers[e.layer as usize].file {
                LayerFile::Plain(b) => b.plan_read(file_offset(&e, offset), &mut buf[..len]),
                // A failure is the miss path's to report.
                LayerFile::Compressed(z) => match decode_here(z, file_offset(&e, offset), &mut buf[..len]) {
                    Ok(Some(n)) => ReadPlan::Copied(n),
                    _ => ReadPlan::Miss,
                },
            },
            None => ReadPlan::Miss,
        }
    }

    fn read_cached_into(&self, offset: u64, buf: &mut [u8]) -> Result<Option<usize>> {
        let len = self.clip(offset, buf.len());
        if len == 0 {
            return Ok(Some(0));
        }
        match self.single(offset, len as u64) {
            Some(None) => {
                buf[..len].fill(0);
                Ok(Some(len))
            }
            Some(Some(e)) if e.zeroed => {
                buf[..len].fill(0);
                Ok(Some(len))
            }
            Some(Some(e)) => match &self.layers[e.layer as usize].file {
                LayerFile::Plain(b) => b.read_cached_into(file_offset(&e, offset), &mut buf[..len]),
                LayerFile::Compressed(z) => decode_here(z, file_offset(&e, offset), &mut buf[..len]),
            },
            None => Ok(None),
        }
    }

    fn direct_refused(&self) {
        for l in &self.layers {
            l.blob.direct_refused();
        }
    }

    async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let n = self.clip(offset, buf.len());
        let mut done = 0usize;
        let mut i = self.first_after((offset) / SECTOR);
        while done < n {
            let at = offset + done as u64;
            // Skip extents that end at or before this byte's sector end (a read may start
            // inside a sector).
            while self.extents.get(i).is_some_and(|e| e.end() * SECTOR <= at) {
                i += 1;
            }
            let left = n - done;
            match self.extents.get(i) {
                Some(e) if e.offset * SECTOR <= at => {
                    let take = ((e.end() * SECTOR - at) as usize).min(left);
                    let dst = &mut buf[done..done + take];
                    if e.zeroed {
                        dst.fill(0);
                    } else {
                        let l = &self.layers[e.layer as usize];
                        let got = l.file.read_into(file_offset(e, at), dst).await?;
                        if got != take {
                            return Err(corrupt(&l.what, format!("extent at sector {} runs past the end of the layer", e.offset)));
                        }
                    }
                    done += take;
                }
                next => {
                    let gap_end = next.map_or(u64::MAX, |e| e.offset * SECTOR);
                    let take = ((gap_end - at).min(left as u64)) as usize;
                    buf[done..done + take].fill(0);
                    done += take;
                }
            }
        }
        Ok(n)
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        let mut out = vec![0u8; self.clip(offset, len.min(usize::MAX as u64) as usize)];
        let got = self.read_into(offset, &mut out).await?;
        out.truncate(got);
        Ok(Bytes::from(out))
    }

    fn condition(&self) -> Condition {
        let top = self.layers[self.layers.len() - 1].blob.condition();
        if top.abnormal {
            return top;
        }
        self.layers.iter().map(|l| l.blob.condition()).find(|c| c.abnormal).unwrap_or(top)
    }

    fn stats(&self) -> StatsSnapshot {
        let mut all = StatsSnapshot::default();
        for l in &self.layers {
            all.add(&l.blob.stats());
        }
        all
    }

    async fn close(&self) -> Result<()> {
        let mut first = Ok(());
        for l in &self.layers {
            let r = l.blob.clone().close().await;
            first = first.and(r);
        }
        first
    }
}

/// The stack of layer blobs (bottom first, each with where it is) as a device.
pub async fn open_stack(blobs: Vec<(String, LazyImage)>) -> Result<View> {
    Ok(Arc::new(Stack::open(blobs).await?) as View)
}
