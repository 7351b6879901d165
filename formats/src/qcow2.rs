//! qcow2 (qemu's copy-on-write disk format; spec: qemu's docs/interop/qcow2.rst), read-only.
//! The qcow2 file is a lazily fetched blob: its header, L1 table and the L2 tables a read needs
//! are fetched like any other chunk, and a guest read becomes reads of the clusters it maps to:
//! data in this file, zeros, a compressed cluster (raw deflate or zstd), or the backing image.
//!
//! Images are untrusted input: every offset and size is checked against the file before it is
//! used, tables and decompressed clusters are bounded, and what this reader does not support
//! (encryption, external data files, a dirty or corrupt image, unknown incompatible features, a
//! chain deeper than `MAX_CHAIN`) is refused with a precise error.

use crate::{corrupt, refuse, BlobOpener};
use async_trait::async_trait;
use bytes::Bytes;
use lazy_image_engine::{BlockView, Condition, Error, ErrorKind, LazyImage, ReadPlan, Result, StatsSnapshot, View};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub const MAGIC: [u8; 4] = [b'Q', b'F', b'I', 0xfb];
/// Bytes of a version 2 header (version 3 adds fields up to `header_length`).
const HEADER_V2: usize = 72;
/// Backing files deeper than this are refused (a loop of backing names ends here too).
pub const MAX_CHAIN: u32 = 16;
/// qemu's own bound on the L1 table.
const MAX_L1_BYTES: u64 = 32 << 20;
/// L2 tables kept in memory per image, in bytes.
const L2_CACHE_BYTES: u64 = 32 << 20;
/// qemu's bound on a backing file name.
const MAX_BACKING_NAME: u32 = 1023;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Deflate,
    Zstd,
}

/// What the reader needs of a qcow2 header, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// Guest bytes.
    pub size: u64,
    pub l1_size: u64,
    pub l1_offset: u64,
    pub extended_l2: bool,
    pub compression: Compression,
    /// Where the backing file name is, if there is one: (offset, length).
    pub backing_name_at: Option<(u64, u32)>,
    /// The backing file's format from the header extension, if given.
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

impl Header {
    /// Parses and checks the header at the start of `buf` (the file's first bytes, as many as
    /// there are up to the first cluster's end) of a file of `file_size` bytes.
    pub fn parse(buf: &[u8], file_size: u64, what: &str) -> Result<Header> {
        if buf.len() < HEADER_V2 || buf[..4] != MAGIC {
            return Err(refuse(what, "not a qcow2 image (no QFI\\xfb magic)"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(refuse(what, format!("qcow2 version {version} is not supported (2 and 3 are)")));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(what, format!("cluster_bits {cluster_bits} is outside 9..=21")));
        }
        let cs = 1u64 << cluster_bits;
        if be32(buf, 32) != 0 {
            return Err(refuse(what, "encrypted qcow2 images are not supported"));
        }
        let size = be64(buf, 24);
        let l1_size = u64::from(be32(buf, 36));
        let l1_offset = be64(buf, 40);
        let (mut incompat, mut header_len, mut compression) = (0u64, HEADER_V2 as u64, Compression::Deflate);
        if version == 3 {
            if buf.len() < 104 {
                return Err(corrupt(what, "version 3 header shorter than 104 bytes"));
            }
            incompat = be64(buf, 72);
            header_len = u64::from(be32(buf, 100));
            if header_len < 104 || header_len > buf.len() as u64 || header_len % 8 != 0 {
                return Err(corrupt(what, format!("header_length {header_len} is not a multiple of 8 within the first cluster")));
            }
            if incompat & INCOMPAT_COMPRESSION != 0 {
                if header_len < 105 {
                    return Err(corrupt(what, "compression type bit set but no compression_type field"));
                }
                compression = match buf[104] {
                    0 => Compression::Deflate,
                    1 => Compression::Zstd,
                    t => return Err(refuse(what, format!("compression type {t} is not supported (0 deflate, 1 zstd)"))),
                };
            }
        }
        let problems = [
            (INCOMPAT_DIRTY, "the image is marked dirty (not closed cleanly: run qemu-img check -r all on it)"),
            (INCOMPAT_CORRUPT, "the image is marked corrupt"),
            (INCOMPAT_EXTERNAL_DATA, "external data files are not supported"),
        ];
        for (bit, why) in problems {
            if incompat & bit != 0 {
                return Err(refuse(what, why));
            }
        }
        let unknown =
            incompat & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_EXTERNAL_DATA | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2);
        if unknown != 0 {
            return Err(refuse(what, format!("unknown incompatible features {unknown:#x}")));
        }
        let extended_l2 = incompat & INCOMPAT_EXTENDED_L2 != 0;
        if extended_l2 && cluster_bits < 14 {
            return Err(corrupt(what, "extended L2 entries need clusters of 16 KiB or more"));
        }
        // Guest offsets must fit the 56-bit host offsets qemu's tables can hold.
        if size > 1 << 56 {
            return Err(corrupt(what, format!("virtual size {size} is too large")));
        }
        let per_l2 = cs / entry_bytes(extended_l2);
        let needed = size.div_ceil(cs * per_l2);
        if l1_size < needed {
            return Err(corrupt(what, format!("L1 table of {l1_size} entries is too small for {size} bytes ({needed} needed)")));
        }
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(corrupt(what, format!("L1 table of {l1_size} entries is larger than {MAX_L1_BYTES} bytes")));
        }
        if !l1_offset.is_multiple_of(cs) || l1_offset.checked_add(l1_size * 8).is_none_or(|e| e > file_size) {
            return Err(corrupt(what, format!("L1 table at {l1_offset} is not a cluster inside the file")));
        }
        let backing_offset = be64(buf, 8);
        let backing_len = be32(buf, 16);
        let backing_name_at = if backing_offset == 0 {
            None
        } else {
            if backing_len == 0 || backing_len > MAX_BACKING_NAME {
                return Err(corrupt(what, format!("backing file name of {backing_len} bytes")));
            }
            if backing_offset.checked_add(u64::from(backing_len)).is_none_or(|e| e > file_size) {
                return Err(corrupt(what, "backing file name lies outside the file"));
            }
            Some((backing_offset, backing_len))
        };
        let backing_format = extensions(buf, header_len as usize, what)?;
        Ok(Header { version, cluster_bits, size, l1_size, l1_offset, extended_l2, compression, backing_name_at, backing_format })
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

fn entry_bytes(extended: bool) -> u64 {
    if extended {
        16
    } else {
        8
    }
}

/// Walks the header extensions after the header; returns the backing format, if named.
fn extensions(buf: &[u8], mut at: usize, what: &str) -> Result<Option<String>> {
    let mut format = None;
    loop {
        if at + 8 > buf.len() {
            // qemu tolerates a missing end marker at the end of the first cluster.
            return Ok(format);
        }
        let (kind, len) = (be32(buf, at), be32(buf, at + 4) as usize);
        if kind == EXT_END {
            return Ok(format);
        }
        let data = at + 8;
        let Some(end) = data.checked_add(len).filter(|&e| e <= buf.len()) else {
            return Err(corrupt(what, format!("header extension {kind:#x} of {len} bytes runs past the first cluster")));
        };
        if kind == EXT_BACKING_FORMAT {
            let name = String::from_utf8(buf[data..end].to_vec()).map_err(|_| corrupt(what, "backing format name is not UTF-8"))?;
            format = Some(name);
        }
        at = data + len.div_ceil(8) * 8;
    }
}

/// Where a stretch of guest bytes comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// This file, from this host offset.
    Data(u64),
    Zero,
    /// The backing image (zeros without one).
    Backing,
    /// A compressed cluster: its bytes in this file.
    Compressed {
        offset: u64,
        len: u64,
    },
}

/// One qcow2 image of a chain, as a device.
pub struct Qcow2 {
    blob: LazyImage,
    what: String,
    h: Header,
    l1: Vec<u64>,
    backing: Option<View>,
    l2: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
    l2_max: usize,
    /// The last cluster decompressed: sequential reads of a compressed image read each one
    /// many times over.
    last_compressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

/// True when `head` (a blob's first bytes) is the start of a qcow2 header.
pub fn has_magic(head: &[u8]) -> bool {
    head.len() >= HEADER_V2 && head[..4] == MAGIC
}

/// True when the blob starts with the qcow2 magic.
pub async fn is_qcow2(blob: &LazyImage) -> Result<bool> {
    Ok(has_magic(&blob.read(0, blob.size().min(HEADER_V2 as u64)).await?))
}

impl Qcow2 {
    /// Opens the qcow2 image in `blob` (found at `url`) and, through `opener`, its backing
    /// chain; `above` are the URLs of the images above it.
    pub fn open<'a>(
        blob: LazyImage,
        url: &'a str,
        opener: &'a dyn BlobOpener,
        above: Vec<String>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<View>> + Send + 'a>> {
        Box::pin(async move {
            let what = format!("qcow2 image {url}");
            let file_size = blob.size();
            // The header and its extensions lie in the first cluster.
            let head = blob.read(0, file_size.min(4096)).await?;
            let cluster = if head.len() >= 24 { 1u64 << be32(&head, 20).clamp(9, 21) } else { 4096 };
            let first =
                if cluster > 4096 { blob.read(0, file_size.min(cluster)).await? } else { head.slice(..head.len().min(cluster as usize)) };
            let h = Header::parse(&first, file_size, &what)?;
            let raw = blob.read(h.l1_offset, h.l1_size * 8).await?;
            let l1: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
            let backing = match h.backing_name_at {
                None => None,
                Some((at, len)) => {
                    if above.len() as u32 + 1 >= MAX_CHAIN {
                        return Err(refuse(&what, format!("backing chain deeper than {MAX_CHAIN} images")));
                    }
                    let name = blob.read(at, u64::from(len)).await?;
                    let name = std::str::from_utf8(&name).map_err(|_| corrupt(&what, "backing file name is not UTF-8"))?;
                    let burl = resolve_backing(url, name).map_err(|e| Error::with_source(e.kind(), what.clone(), e))?;
                    if burl == url || above.contains(&burl) {
                        return Err(refuse(&what, format!("backing file {burl} is already in the chain above it (a loop)")));
                    }
                    let bblob = opener.open(&burl).await?;
                    let qcow = match h.backing_format.as_deref() {
                        Some("raw") => false,
                        Some("qcow2") => true,
                        Some(f) => return Err(refuse(&what, format!("backing format {f:?} is not supported (raw, qcow2)"))),
                        None => is_qcow2(&bblob).await?,
                    };
                    let mut chain = above;
                    chain.push(url.to_string());
                    Some(if qcow { Qcow2::open(bblob, &burl, opener, chain).await? } else { bblob.view() })
                }
            };
            let l2_max = (L2_CACHE_BYTES / h.cluster_size()).max(1) as usize;
            let q = Qcow2 { blob, what, h, l1, backing, l2: Mutex::default(), l2_max, last_compressed: Mutex::default() };
            Ok(Arc::new(q) as View)
        })
    }

    fn cs(&self) -> u64 {
        self.h.cluster_size()
    }

    fn per_l2(&self) -> u64 {
        self.cs() / entry_bytes(self.h.extended_l2)
    }

    /// The L2 table's offset for guest cluster `c`, or None when unallocated.
    fn l2_offset(&self, c: u64) -> Result<Option<u64>> {
        let e = self.l1.get((c / self.per_l2()) as usize).copied().unwrap_or(0);
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cs()) || off.checked_add(self.cs()).is_none_or(|end| end > self.blob.size()) {
            return Err(corrupt(&self.what, format!("L2 table at {off} is not a cluster inside the file")));
        }
        Ok(Some(off))
    }

    fn cached_l2(&self, off: u64) -> Option<Arc<Vec<u64>>> {
        self.l2.lock().unwrap_or_else(|p| p.into_inner()).get(&off).cloned()
    }

    async fn load_l2(&self, off: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(t) = self.cached_l2(off) {
            return Ok(t);
        }
        let raw = self.blob.read(off, self.cs()).await?;
        let t = Arc::new(raw.chunks_exact(8).map(|c| be64(c, 0)).collect::<Vec<u64>>());
        let mut cache = self.l2.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.l2_max {
            cache.clear();
        }
        cache.insert(off, t.clone());
        Ok(t)
    }

    /// Where guest byte `g` comes from, given its L2 table (None: unallocated), and how many
    /// bytes from `g` on come from the same kind of place (to the end of its (sub)cluster).
    fn classify(&self, g: u64, table: Option<&[u64]>) -> Result<(Source, u64)> {
        let cs = self.cs();
        let (c, within) = (g / cs, g % cs);
        let to_cluster_end = cs - within;
        let Some(table) = table else { return Ok((Source::Backing, to_cluster_end)) };
        let i = (c % self.per_l2()) as usize;
        let width = entry_bytes(self.h.extended_l2) as usize / 8;
        let e = table[i * width];
        if e & COMPRESSED != 0 {
            let shift = 62 - (self.h.cluster_bits - 8);
            let offset = e & ((1u64 << shift) - 1);
            let sectors = ((e >> shift) & ((1u64 << (self.h.cluster_bits - 8)) - 1)) + 1;
            let len = (sectors * 512 - (offset & 511)).min(self.blob.size().saturating_sub(offset));
            if offset >= self.blob.size() {
                return Err(corrupt(&self.what, format!("compressed cluster at {offset} lies outside the file")));
            }
            return Ok((Source::Compressed { offset, len }, to_cluster_end));
        }
        let host = e & OFFSET_MASK;
        // A cluster may end past the end of the file (only some of its subclusters written):
        // what lies past the end reads as zeros, as qemu reads it.
        let data = |host: u64| -> Result<()> {
            if !host.is_multiple_of(cs) || host.checked_add(cs).is_none_or(|end| end > 1 << 56) {
                return Err(corrupt(&self.what, format!("data cluster at {host} is not cluster aligned")));
            }
            Ok(())
        };
        if !self.h.extended_l2 {
            if self.h.version == 3 && e & ZERO != 0 {
                return Ok((Source::Zero, to_cluster_end));
            }
            if host == 0 {
                return Ok((Source::Backing, to_cluster_end));
            }
            data(host)?;
            return Ok((Source::Data(host + within), to_cluster_end));
        }
        let bitmap = table[i * width + 1];
        let sc_size = cs / 32;
        let sc = (within / sc_size) as u32;
        let to_sc_end = sc_size - within % sc_size;
        let (alloc, zero) = (bitmap >> sc & 1 == 1, bitmap >> (32 + sc) & 1 == 1);
        Ok(match (alloc, zero) {
            (true, true) => return Err(corrupt(&self.what, format!("subcluster {sc} of cluster {c} is both allocated and zero"))),
            (false, true) => (Source::Zero, to_sc_end),
            (false, false) => (Source::Backing, to_sc_end),
            (true, false) if host == 0 => {
                return Err(corrupt(&self.what, format!("subcluster {sc} of cluster {c} is allocated at offset 0")))
            }
            (true, false) => {
                data(host)?;
                (Source::Data(host + within), to_sc_end)
            }
        })
    }

    async fn decompress(&self, offset: u64, len: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((at, bytes)) = self.last_compressed.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            if *at == offset {
                return Ok(bytes.clone());
            }
        }
        let src = self.blob.read(offset, len).await?;
        let cs = self.cs() as usize;
        let (what, algo) = (self.what.clone(), self.h.compression);
        let out = tokio::task::spawn_blocking(move || {
            inflate(&src, cs, algo).map_err(|why| corrupt(&what, format!("compressed cluster at {offset}: {why}")))
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::CacheIo, "decompression task", e))??;
        let out = Arc::new(out);
        *self.last_compressed.lock().unwrap_or_else(|p| p.into_inner()) = Some((offset, out.clone()));
        Ok(out)
    }

    /// The one source of `[offset, offset + len)` if it has one and its table is in memory.
    fn plan_source(&self, offset: u64, len: usize) -> Option<Source> {
        let c = offset / self.cs();
        let table = match self.l2_offset(c).ok()? {
            None => None,
            Some(off) => Some(self.cached_l2(off)?),
        };
        let (src, run) = self.classify(offset, table.as_deref().map(|t| &t[..])).ok()?;
        (run >= len as u64).then_some(src)
    }
}

/// Decompresses one cluster of `cs` bytes from `src` (which may run on past the cluster's
/// stream: its length is rounded up to sectors).
pub fn inflate(src: &[u8], cs: usize, algo: Compression) -> std::result::Result<Vec<u8>, String> {
    let mut out = vec![0u8; cs];
    match algo {
        Compression::Deflate => {
            let mut d = flate2::Decompress::new(false);
            d.decompress(src, &mut out, flate2::FlushDecompress::Finish).map_err(|e| format!("deflate: {e}"))?;
            if d.total_out() != cs as u64 {
                return Err(format!("deflate gave {} of {cs} bytes", d.total_out()));
            }
        }
        Compression::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut d = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
            let mut input = InBuffer::around(src);
            let mut output = OutBuffer::around(&mut out[..]);
            while output.pos() < cs {
                let (i, o) = (input.pos(), output.pos());
                d.run(&mut input, &mut output).map_err(|e| format!("zstd: {e}"))?;
                if input.pos() == i && output.pos() == o {
                    return Err(format!("zstd gave {} of {cs} bytes", output.pos()));
                }
            }
        }
    }
    Ok(out)
}

/// The URL of a backing file named `name` by the image at `child`: relative names resolve
/// against the child's location. A remote image's backing file stays remote and a local one's
/// local: an image never leads the node to read from a place of another kind.
pub fn resolve_backing(child: &str, name: &str) -> Result<String> {
    let remote = |u: &str| u.starts_with("http://") || u.starts_with("https://");
    if remote(child) {
        let base = url::Url::parse(child).map_err(|e| refuse(child, e))?;
        let joined = base.join(name).map_err(|e| refuse(&format!("backing file {name:?}"), e))?;
        if !remote(joined.as_str()) {
            return Err(refuse(&format!("backing file {name:?}"), "an image served over HTTP may only name a backing file over HTTP"));
        }
        return Ok(joined.to_string());
    }
    if name.contains("://") && !name.starts_with("file://") {
        return Err(refuse(&format!("backing file {name:?}"), "a local image may only name a local backing file"));
    }
    let (scheme, path) = match child.strip_prefix("file://") {
        Some(p) => ("file://", p),
        None => ("", child),
    };
    let name = name.strip_prefix("file://").unwrap_or(name);
    let dir = std::path::Path::new(path).parent().unwrap_or(std::path::Path::new("/"));
    Ok(format!("{scheme}{}", dir.join(name).display()))
}

#[async_trait]
impl BlockView for Qcow2 {
    fn size(&self) -> u64 {
        self.h.size
    }

    fn chunk_size(&self) -> u64 {
        self.blob.chunk_size()
    }

    fn plan_read(&self, offset: u64, buf: &mut [u8]) -> ReadPlan<'_> {
        if offset >= self.h.size || buf.is_empty() {
            return ReadPlan::Copied(0);
        }
        let len = buf.len().min((self.h.size - offset) as usize);
        match self.plan_source(offset, len) {
            Some(Source::Data(host)) if host + len as u64 <= self.blob.size() => self.blob.plan_read(host, &mut buf[..len]),
            Some(Source::Zero) => {
                buf[..len].fill(0);
                ReadPlan::Copied(len)
            }
            Some(Source::Backing) if self.backing.is_none() => {
                buf[..len].fill(0);
                ReadPlan::Copied(len)
            }
            _ => ReadPlan::Miss,
        }
    }

    fn read_cached_into(&self, offset: u64, buf: &mut [u8]) -> Result<Option<usize>> {
        if offset >= self.h.size || buf.is_empty() {
            return Ok(Some(0));
        }
        let len = buf.len().min((self.h.size - offset) as usize);
        match self.plan_source(offset, len) {
            Some(Source::Data(host)) if host + len as u64 <= self.blob.size() => self.blob.read_cached_into(host, &mut buf[..len]),
            Some(Source::Zero) => {
                buf[..len].fill(0);
                Ok(Some(len))
            }
            _ => Ok(None),
        }
    }

    fn direct_refused(&self) {
        self.blob.direct_refused()
    }

    async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= self.h.size {
            return Ok(0);
        }
        let n = buf.len().min((self.h.size - offset) as usize);
        let mut done = 0usize;
        while done < n {
            let g = offset + done as u64;
            let c = g / self.cs();
            let table = match self.l2_offset(c)? {
                None => None,
                Some(off) => Some(self.load_l2(off).await?),
            };
            let (src, run) = self.classify(g, table.as_deref().map(|t| &t[..]))?;
            let take = (run as usize).min(n - done);
            let dst = &mut buf[done..done + take];
            match src {
                Source::Data(host) => {
                    let got = if host < self.blob.size() { self.blob.read_into(host, dst).await? } else { 0 };
                    dst[got..].fill(0);
                }
                Source::Zero => dst.fill(0),
                Source::Backing => match &self.backing {
                    None => dst.fill(0),
                    Some(b) => {
                        let got = if g < b.size() { b.read_into(g, dst).await? } else { 0 };
                        // A backing image smaller than this one reads as zeros past its end.
                        dst[got..].fill(0);
                    }
                },
                Source::Compressed { offset: co, len } => {
                    let cluster = self.decompress(co, len).await?;
                    let within = (g % self.cs()) as usize;
                    dst.copy_from_slice(&cluster[within..within + take]);
                }
            }
            done += take;
        }
        Ok(n)
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        let n = len.min(self.h.size.saturating_sub(offset));
        let mut out = vec![0u8; n as usize];
        let got = self.read_into(offset, &mut out).await?;
        out.truncate(got);
        Ok(Bytes::from(out))
    }

    fn condition(&self) -> Condition {
        let own = self.blob.condition();
        match &self.backing {
            Some(b) if !own.abnormal => b.condition(),
            _ => own,
        }
    }

    fn stats(&self) -> StatsSnapshot {
        let mut all = self.blob.stats();
        if let Some(b) = &self.backing {
            all.add(&b.stats());
        }
        all
    }

    async fn close(&self) -> Result<()> {
        let own = self.blob.clone().close().await;
        match &self.backing {
            Some(b) => own.and(b.close().await),
            None => own,
        }
    }
}
