//! ZFile, OverlayBD's seekable compression (containerd/overlaybd `src/overlaybd/zfile/`): a
//! 512-byte header, the original file cut into fixed-size blocks each compressed on its own
//! (LZ4 block format or a zstd frame), optionally each followed by a CRC32C, then a table of the
//! compressed lengths and a 512-byte trailer. Reading byte `o` of the original file means
//! finding block `o / block_size` through the table, fetching just its bytes from the lazily
//! fetched blob and decompressing it.
//!
//! The writer here never produces a file the reference reader refuses: that reader reads a
//! block into a 64 KiB buffer, so a block whose compressed form is larger (an incompressible
//! 64 KiB block always is) fails it. Blocks are therefore at most 32 KiB. This reader reads
//! such files all the same: the table gives each block's exact length and a block must
//! decompress to exactly its size, so nothing about them is ambiguous.

use super::{le32, le64, read_full};
use crate::{corrupt, refuse};
use lazy_image_engine::{LazyImage, Result};
use std::io::{Read, Seek, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub const SPACE: u64 = 512;
pub const MAGIC0: [u8; 8] = *b"ZFile\0\x01\0";
pub const MAGIC1: [u8; 16] = [0x74, 0x75, 0x6a, 0x69, 0x2e, 0x79, 0x79, 0x66, 0x40, 0x41, 0x6c, 0x69, 0x62, 0x61, 0x62, 0x61];
/// Size of the header struct inside its 512 bytes.
const STRUCT_SIZE: u32 = 96;

const FLAG_HEADER: u64 = 1 << 0;
const FLAG_DATA: u64 = 1 << 1;
const FLAG_SEALED: u64 = 1 << 2;
const FLAG_HEADER_OVERWRITE: u64 = 1 << 3;
const FLAG_DIGEST: u64 = 1 << 4;
const FLAG_INDEX_COMPRESSED: u64 = 1 << 5;

/// The reference reader's buffer for one read of compressed blocks.
pub const REFERENCE_READ_BUFFER: usize = 64 << 10;
/// Block sizes this writer produces (see the module comment for the upper bound).
pub const WRITE_BLOCK_SIZES: std::ops::RangeInclusive<u32> = 4096..=32768;
/// More blocks than this are refused (the table costs about 4 bytes a block in memory).
pub const MAX_BLOCKS: u64 = 64 << 20;
/// Seed of the per-block CRC32C (OverlayBD's own constant).
const BLOCK_CRC_SEED: u32 = 100_007;
/// Decompressed blocks kept, for readers that read a block in pieces.
const RECENT_BLOCKS: usize = 8;
/// Reads spanning more blocks than this decompress where the runtime allows blocking.
const INLINE_BLOCKS: usize = 64;

/// A piece of a read (see `ZFile::pieces`).
enum Piece {
    /// Block `.0`, decoded already (kept from an earlier read that covered it in part).
    Decoded(usize, Arc<Vec<u8>>),
    /// Blocks `i..=j`, compressed in `[start, end)` of the file.
    Run { i: usize, j: usize, start: u64, end: u64 },
}

thread_local! {
    /// Compressed bytes `read_resident` reads, kept for the thread's next read: no allocation
    /// and no zeroing per read on a backend's queue thread.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    Lz4,
    Zstd,
}

impl Algo {
    fn code(self) -> u8 {
        match self {
            Algo::Lz4 => 1,
            Algo::Zstd => 2,
        }
    }

    /// The most bytes a block of `n` bytes compresses to.
    fn bound(self, n: usize) -> usize {
        match self {
            Algo::Lz4 => lz4_flex::block::get_maximum_output_size(n),
            Algo::Zstd => zstd::zstd_safe::compress_bound(n),
        }
    }
}

impl std::str::FromStr for Algo {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "lz4" => Ok(Algo::Lz4),
            "zstd" => Ok(Algo::Zstd),
            _ => Err(format!("compression {s:?} is not one of lz4, zstd")),
        }
    }
}

/// CRC32C as OverlayBD computes it: the plain polynomial division from `seed`, with no
/// inversion before or after (the `crc32c` crate inverts both).
pub fn raw_crc32c(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// The fields of a header or trailer this reader uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub flags: u64,
    pub index_offset: u64,
    /// Blocks (entries of the table).
    pub index_size: u64,
    pub original_size: u64,
    pub index_crc: u32,
    pub block_size: u32,
    pub algo: Algo,
    pub verify: bool,
}

/// True when `head` starts with the ZFile magic.
pub fn has_magic(head: &[u8]) -> bool {
    head.len() >= 24 && head[..8] == MAGIC0 && head[8..24] == MAGIC1
}

/// Parses one 512-byte header or trailer; `trailer` says which it must be.
pub fn parse_ht(b: &[u8], trailer: bool, what: &str) -> Result<Header> {
    let part = if trailer { "trailer" } else { "header" };
    if b.len() < SPACE as usize || !has_magic(b) {
        return Err(refuse(what, format!("not a ZFile (no ZFile magic in its {part})")));
    }
    let flags = le64(b, 32);
    if (flags & FLAG_HEADER != 0) == trailer {
        return Err(corrupt(what, format!("its {part} is marked as the other one")));
    }
    if flags & FLAG_DIGEST != 0 {
        let mut copy = b[..SPACE as usize].to_vec();
        copy[28..32].fill(0);
        let (want, got) = (le32(b, 28), raw_crc32c(0, &copy));
        if want != got {
            return Err(corrupt(what, format!("{part} digest {got:08x} is not the recorded {want:08x}")));
        }
        // Early writers left the bytes past the flags they knew uninitialised, so the index
        // compression bit is only meaningful in headers that carry a digest (which are zeroed).
        if flags & FLAG_INDEX_COMPRESSED != 0 {
            return Err(refuse(what, "a compressed block table is not supported (no OverlayBD writer makes one)"));
        }
    }
    let algo = match b[76] {
        1 => Algo::Lz4,
        2 => Algo::Zstd,
        0 => return Err(refuse(what, "MINI_LZO blocks are not supported (lz4 and zstd are)")),
        a => return Err(refuse(what, format!("compression algorithm {a} is not supported (1 lz4, 2 zstd)"))),
    };
    if b[78] != 0 || le32(b, 84) != 0 {
        return Err(refuse(what, "compression dictionaries are not supported"));
    }
    let block_size = le32(b, 72);
    if !block_size.is_power_of_two() || !(4096..=65536).contains(&block_size) {
        return Err(corrupt(what, format!("block size {block_size} is not a power of two from 4 KiB to 64 KiB")));
    }
    Ok(Header {
        flags,
        index_offset: le64(b, 40),
        index_size: le64(b, 48),
        original_size: le64(b, 56),
        index_crc: le32(b, 64),
        block_size,
        algo,
        verify: b[88] != 0,
    })
}

/// Where each block's compressed bytes start, kept compactly: a base every `GROUP` blocks and
/// every block's length.
const GROUP: usize = 64;

struct Table {
    bases: Vec<u64>,
    lens: Vec<u32>,
}

impl Table {
    fn start(&self, i: usize) -> u64 {
        let g = i / GROUP;
        self.bases[g] + self.lens[g * GROUP..i].iter().map(|&l| u64::from(l)).sum::<u64>()
    }
}

/// A ZFile over a lazily fetched blob, read as the original file.
pub struct ZFile {
    blob: LazyImage,
    what: String,
    h: Header,
    table: Table,
    recent: Mutex<Vec<(usize, Arc<Vec<u8>>)>>,
    /// Blocks whose CRC matched once: the blob's cached bytes never change while it is open
    /// (an origin that changed is refused, not mixed), so a block is checked when it is first
    /// decoded, as the engine checks a chunk when it arrives, not at every read.
    verified: Vec<AtomicU64>,
}

impl ZFile {
    pub async fn open(blob: LazyImage, what: &str) -> Result<ZFile> {
        let size = blob.size();
        if size < 2 * SPACE {
            return Err(corrupt(what, format!("{size} bytes is too short for a ZFile")));
        }
        let head = blob.read(0, SPACE).await?;
        let mut h = parse_ht(&head, false, what)?;
        let trailer_at = size - SPACE;
        if h.flags & FLAG_HEADER_OVERWRITE == 0 {
            if h.flags & FLAG_DATA == 0 {
                return Err(refuse(what, "a ZFile index file is not supported (data files are)"));
            }
            let tail = blob.read(trailer_at, SPACE).await?;
            h = parse_ht(&tail, true, what)?;
            if h.flags & FLAG_DATA == 0 || h.flags & FLAG_SEALED == 0 {
                return Err(corrupt(what, "its trailer is not a sealed data file's"));
            }
        }
        let bs = u64::from(h.block_size);
        let blocks = h.original_size.div_ceil(bs);
        if h.index_size != blocks {
            return Err(corrupt(what, format!("{} table entries for {} bytes in {bs}-byte blocks", h.index_size, h.original_size)));
        }
        if blocks > MAX_BLOCKS {
            return Err(refuse(what, format!("{blocks} blocks is more than {MAX_BLOCKS}: compress with larger blocks")));
        }
        let index_bytes = blocks * 4;
        if h.index_offset < SPACE || h.index_offset.checked_add(index_bytes).is_none_or(|e| e > trailer_at) {
            return Err(corrupt(what, "its block table lies outside the file"));
        }
        let raw = blob.read(h.index_offset, index_bytes).await?;
        if raw.len() as u64 != index_bytes {
            return Err(corrupt(what, "its block table is cut short"));
        }
        if h.flags & FLAG_DIGEST != 0 && raw_crc32c(0, &raw) != h.index_crc {
            return Err(corrupt(what, "its block table does not match the table checksum"));
        }
        let crc: u64 = if h.verify { 4 } else { 0 };
        let max = h.algo.bound(h.block_size as usize) as u64 + crc;
        let mut table = Table { bases: Vec::with_capacity((blocks as usize).div_ceil(GROUP)), lens: Vec::with_capacity(blocks as usize) };
        let mut at = SPACE;
        for (i, c) in raw.chunks_exact(4).enumerate() {
            let len = le32(c, 0);
            if u64::from(len) <= crc || u64::from(len) > max {
                return Err(corrupt(what, format!("block {i} has a compressed length of {len} bytes")));
            }
            if i % GROUP == 0 {
                table.bases.push(at);
            }
            table.lens.push(len);
            at += u64::from(len);
        }
        if at > h.index_offset {
            return Err(corrupt(what, "its blocks run into the block table"));
        }
        let verified = (0..blocks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Ok(ZFile { blob, what: what.to_string(), h, table, recent: Mutex::default(), verified })
    }

    /// Bytes of the original file.
    pub fn size(&self) -> u64 {
        self.h.original_size
    }

    pub fn header(&self) -> &Header {
        &self.h
    }

    fn is_verified(&self, i: usize) -> bool {
        self.verified[i / 64].load(Ordering::Relaxed) & (1 << (i % 64)) != 0
    }

    fn mark_verified(&self, i: usize) {
        self.verified[i / 64].fetch_or(1 << (i % 64), Ordering::Relaxed);
    }

    /// Block `k` decoded into `out`, its CRC checked unless it was before.
    fn decode(&self, k: usize, stored: &[u8], out: &mut [u8]) -> Result<()> {
        let check = self.h.verify && !self.is_verified(k);
        decode_block(&self.h, stored, out, check).map_err(|why| corrupt(&self.what, format!("block {k}: {why}")))?;
        if check {
            self.mark_verified(k);
        }
        Ok(())
    }

    fn recent(&self, i: usize) -> Option<Arc<Vec<u8>>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|(b, _)| *b == i).map(|(_, d)| d.clone())
    }

    fn remember(&self, i: usize, d: Arc<Vec<u8>>) {
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() >= RECENT_BLOCKS {
            r.remove(0);
        }
        r.push((i, d));
    }

    /// The blocks `[first, last]` a read of `n` bytes at `offset` covers (`None` past the end).
    fn span(&self, offset: u64, n: usize) -> Option<(usize, usize, usize)> {
        if offset >= self.h.original_size {
            return None;
        }
        let n = n.min((self.h.original_size - offset) as usize);
        let bs = self.h.block_size as u64;
        Some(((offset / bs) as usize, ((offset + n as u64 - 1) / bs) as usize, n))
    }

    /// What a read of blocks `[first, last]` is made of: blocks decoded in memory already, and
    /// runs of the others, each fetched in one read of their compressed bytes.
    fn pieces(&self, first: usize, last: usize) -> Vec<Piece> {
        let mut pieces = Vec::new();
        let mut i = first;
        while i <= last {
            if let Some(d) = self.recent(i) {
                pieces.push(Piece::Decoded(i, d));
                i += 1;
                continue;
            }
            let mut j = i;
            while j < last && self.recent(j + 1).is_none() {
                j += 1;
            }
            pieces.push(Piece::Run { i, j, start: self.table.start(i), end: self.table.start(j) + u64::from(self.table.lens[j]) });
            i = j + 1;
        }
        pieces
    }

    /// Puts `piece` of a read at `offset` into `dst` (a run's compressed bytes are `raw`);
    /// returns the bytes put.
    fn put(&self, piece: &Piece, raw: &[u8], offset: u64, dst: &mut [u8]) -> Result<usize> {
        match *piece {
            Piece::Decoded(i, ref d) => Ok(self.copy_out(i, d, offset, dst)),
            Piece::Run { i, j, start, end } => {
                if raw.len() as u64 != end - start {
                    return Err(corrupt(&self.what, format!("blocks {i}..={j} are cut short")));
                }
                self.decode_run(i, j, start, raw, offset, dst)
            }
        }
    }

    /// `buf.len()` bytes of the original file at `offset` (fewer at its end).
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let Some((first, last, n)) = self.span(offset, buf.len()) else { return Ok(0) };
        let mut done = 0usize;
        for piece in self.pieces(first, last) {
            let raw = match piece {
                Piece::Run { start, end, .. } => self.blob.read(start, end - start).await?,
                Piece::Decoded(..) => bytes::Bytes::new(),
            };
            done += self.put(&piece, &raw, offset, &mut buf[done..n])?;
        }
        Ok(n)
    }

    /// `read_into` done on the caller's thread if it needs no wait: the compressed bytes all
    /// cached and in the page cache (`LazyImage::read_resident`). `None` otherwise. A backend's
    /// queue thread then decodes a warm sequential read itself, with no hop to the runtime.
    pub fn read_resident(&self, offset: u64, buf: &mut [u8]) -> Result<Option<usize>> {
        let Some((first, last, n)) = self.span(offset, buf.len()) else { return Ok(Some(0)) };
        let mut done = 0usize;
        for piece in self.pieces(first, last) {
            let put = SCRATCH.with(|scratch| {
                let mut raw = scratch.borrow_mut();
                let len = match piece {
                    Piece::Run { start, end, .. } => (end - start) as usize,
                    Piece::Decoded(..) => 0,
                };
                if raw.len() < len {
                    raw.resize(len, 0);
                }
                if let Piece::Run { start, .. } = piece {
                    if self.blob.read_resident(start, &mut raw[..len])? != Some(len) {
                        return Ok(None);
                    }
                }
                self.put(&piece, &raw[..len], offset, &mut buf[done..n]).map(Some)
            })?;
            match put {
                Some(d) => done += d,
                None => return Ok(None),
            }
        }
        Ok(Some(n))
    }

    fn copy_out(&self, i: usize, block: &[u8], offset: u64, dst: &mut [u8]) -> usize {
        let bs = self.h.block_size as u64;
        let from = offset.max(i as u64 * bs) - i as u64 * bs;
        let take = (block.len() as u64 - from).min(dst.len() as u64) as usize;
        dst[..take].copy_from_slice(&block[from as usize..from as usize + take]);
        take
    }

    /// Decodes blocks `i..=j` (their bytes in `raw`, which starts at file offset `start`) into
    /// `dst`, which continues the read at `offset`: a block the read covers whole straight into
    /// it, a block it covers in part into memory kept for the next reads. A long run is decoded
    /// where blocking is allowed.
    fn decode_run(&self, i: usize, j: usize, start: u64, raw: &[u8], offset: u64, dst: &mut [u8]) -> Result<usize> {
        let bs = self.h.block_size as u64;
        let end = offset + dst.len() as u64;
        let mut work = || -> Result<usize> {
            let mut done = 0usize;
            for k in i..=j {
                let at = (self.table.start(k) - start) as usize;
                let stored = &raw[at..at + self.table.lens[k] as usize];
                let (b0, expect) = (k as u64 * bs, (self.h.original_size - k as u64 * bs).min(bs) as usize);
                if b0 >= offset && b0 + expect as u64 <= end {
                    self.decode(k, stored, &mut dst[done..done + expect])?;
                    done += expect;
                } else {
                    let mut block = vec![0u8; expect];
                    self.decode(k, stored, &mut block)?;
                    let block = Arc::new(block);
                    done += self.copy_out(k, &block, offset, &mut dst[done..]);
                    self.remember(k, block);
                }
            }
            Ok(done)
        };
        let multi = tokio::runtime::Handle::try_current().is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi && j - i >= INLINE_BLOCKS {
            tokio::task::block_in_place(work)
        } else {
            work()
        }
    }
}

/// One block decompressed to exactly `out.len()` bytes, its CRC (if it has one) checked when
/// `check`.
fn decode_block(h: &Header, stored: &[u8], out: &mut [u8], check: bool) -> std::result::Result<(), String> {
    let data = if h.verify {
        let (data, crc) = stored.split_at(stored.len() - 4);
        if check {
            let (want, got) = (le32(crc, 0), raw_crc32c(BLOCK_CRC_SEED, data));
            if want != got {
                return Err(format!("checksum {got:08x} is not the recorded {want:08x}"));
            }
        }
        data
    } else {
        stored
    };
    let expect = out.len();
    let got = match h.algo {
        Algo::Lz4 => lz4_flex::block::decompress_into(data, out).map_err(|e| format!("lz4: {e}"))?,
        Algo::Zstd => zstd::bulk::decompress_to_buffer(data, out).map_err(|e| format!("zstd: {e}"))?,
    };
    if got != expect {
        return Err(format!("decompressed to {got} bytes, not {expect}"));
    }
    Ok(())
}

/// Options of the ZFile writer.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    pub algo: Algo,
    pub block_size: u32,
    /// A CRC32C after each block.
    pub verify: bool,
}

fn header_bytes(h: &Header, flags: u64) -> [u8; SPACE as usize] {
    let mut b = [0u8; SPACE as usize];
    b[..8].copy_from_slice(&MAGIC0);
    b[8..24].copy_from_slice(&MAGIC1);
    b[24..28].copy_from_slice(&STRUCT_SIZE.to_le_bytes());
    b[32..40].copy_from_slice(&(flags | FLAG_DIGEST).to_le_bytes());
    b[40..48].copy_from_slice(&h.index_offset.to_le_bytes());
    b[48..56].copy_from_slice(&h.index_size.to_le_bytes());
    b[56..64].copy_from_slice(&h.original_size.to_le_bytes());
    b[64..68].copy_from_slice(&h.index_crc.to_le_bytes());
    b[72..76].copy_from_slice(&h.block_size.to_le_bytes());
    b[76] = h.algo.code();
    b[88] = u8::from(h.verify);
    let digest = raw_crc32c(0, &b);
    b[28..32].copy_from_slice(&digest.to_le_bytes());
    b
}

/// Compresses `src` (all of it, from its start) into a ZFile written to `out` as the reference
/// tools lay one out: header, blocks, table, trailer. Returns the compressed file's size.
pub fn write<R: Read, W: Write + Seek>(src: &mut R, out: &mut W, o: WriteOptions) -> std::io::Result<u64> {
    check_write_block_size(u64::from(o.block_size)).map_err(|m| std::io::Error::new(std::io::ErrorKind::InvalidInput, m))?;
    write_blocks(src, out, o, true)
}

/// The block sizes this writer takes (`WRITE_BLOCK_SIZES`, powers of two), or why not.
pub fn check_write_block_size(bs: u64) -> std::result::Result<u32, String> {
    match u32::try_from(bs) {
        Ok(b) if b.is_power_of_two() && WRITE_BLOCK_SIZES.contains(&b) => Ok(b),
        _ => Err(format!(
            "block size {bs} is not a power of two from 4K to 32K (OverlayBD's reader refuses blocks that compress to more than 64 KiB, as incompressible 64 KiB blocks do)"
        )),
    }
}

/// `write` for any block size; `reference_limits` fails a file the reference reader would
/// refuse.
fn write_blocks<R: Read, W: Write + Seek>(src: &mut R, out: &mut W, o: WriteOptions, reference_limits: bool) -> std::io::Result<u64> {
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    let mut h = Header {
        flags: 0,
        index_offset: 0,
        index_size: 0,
        original_size: 0,
        index_crc: 0,
        block_size: o.block_size,
        algo: o.algo,
        verify: o.verify,
    };
    let base = out.stream_position()?;
    out.write_all(&header_bytes(&h, FLAG_HEADER | FLAG_DATA))?;
    let bs = o.block_size as usize;
    let mut block = vec![0u8; bs];
    let mut packed = vec![0u8; o.algo.bound(bs) + 4];
    let mut lens: Vec<u32> = Vec::new();
    let mut zc = match o.algo {
        Algo::Zstd => Some(zstd::bulk::Compressor::new(0)?),
        Algo::Lz4 => None,
    };
    let mut at = SPACE;
    loop {
        let n = read_full(src, &mut block)?;
        if n == 0 {
            break;
        }
        let mut len = match (&mut zc, o.algo) {
            (Some(z), _) => z.compress_to_buffer(&block[..n], &mut packed[..])?,
            (None, _) => {
                lz4_flex::block::compress_into(&block[..n], &mut packed).map_err(|e| std::io::Error::other(format!("lz4: {e}")))?
            }
        };
        if o.verify {
            let crc = raw_crc32c(BLOCK_CRC_SEED, &packed[..len]);
            packed[len..len + 4].copy_from_slice(&crc.to_le_bytes());
            len += 4;
        }
        out.write_all(&packed[..len])?;
        lens.push(len as u32);
        at += len as u64;
        h.original_size += n as u64;
        if n < bs {
            break;
        }
    }
    if reference_limits {
        check_reference_limits(&lens, o.block_size).map_err(invalid)?;
    }
    let table: Vec<u8> = lens.iter().flat_map(|l| l.to_le_bytes()).collect();
    out.write_all(&table)?;
    h.index_offset = at;
    h.index_size = lens.len() as u64;
    h.index_crc = raw_crc32c(0, &table);
    out.write_all(&header_bytes(&h, FLAG_DATA | FLAG_SEALED))?;
    Ok(out.stream_position()? - base)
}

/// What the reference reader needs of the block lengths: each block fits its 64 KiB read
/// buffer, and within a group of `65536 / block_size` blocks the running sum of lengths stays
/// below 65535 (it keeps them as 16-bit deltas).
pub fn check_reference_limits(lens: &[u32], block_size: u32) -> std::result::Result<(), String> {
    let group = (65536 / block_size) as usize;
    for (g, chunk) in lens.chunks(group).enumerate() {
        let mut delta = 0u64;
        for (k, &l) in chunk.iter().enumerate() {
            if l as usize > REFERENCE_READ_BUFFER {
                return Err(format!("block {} compressed to {l} bytes, more than OverlayBD reads at once", g * group + k));
            }
            if k + 1 < chunk.len() {
                delta += u64::from(l);
                if delta >= 65535 {
                    return Err(format!("blocks from {} compressed to more than OverlayBD's table can hold", g * group));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit by bit, for comparison with the table-driven crate.
    fn slow_crc32c(mut crc: u32, data: &[u8]) -> u32 {
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
            }
        }
        crc
    }

    #[test]
    fn raw_crc_is_uninverted_crc32c() {
        for data in [&b""[..], b"a", b"123456789", &[0xffu8; 4099][..]] {
            for seed in [0, BLOCK_CRC_SEED, 0xdead_beef] {
                assert_eq!(raw_crc32c(seed, data), slow_crc32c(seed, data));
            }
        }
        // The standard check value, with the inversions the raw form leaves out.
        assert_eq!(!raw_crc32c(!0, b"123456789"), 0xe306_9283);
    }

    /// A 64 KiB block of random bytes compresses to more than 64 KiB: the reference reader
    /// refuses such a file, this one reads it (the table gives the exact length).
    #[tokio::test]
    async fn blocks_larger_than_the_reference_buffer_still_read() {
        use rand::{RngCore, SeedableRng};
        let mut data = vec![0u8; 3 << 16];
        rand::rngs::StdRng::seed_from_u64(5).fill_bytes(&mut data);
        let mut out = std::io::Cursor::new(Vec::new());
        let o = WriteOptions { algo: Algo::Lz4, block_size: 65536, verify: true };
        write_blocks(&mut &data[..], &mut out, o, false).unwrap();
        let bytes = out.into_inner();
        let dir = tempfile::tempdir().unwrap();
        let src = std::sync::Arc::new(lazy_image_engine::FakeSource::new(bytes));
        let blob = LazyImage::open(src, lazy_image_engine::ImageConfig::new(dir.path())).await.unwrap();
        let z = ZFile::open(blob, "t").await.unwrap();
        assert!(z.table.lens.iter().all(|&l| l as usize > REFERENCE_READ_BUFFER));
        assert!(check_reference_limits(&z.table.lens, 65536).is_err());
        let mut back = vec![0u8; data.len()];
        assert_eq!(z.read_into(0, &mut back).await.unwrap(), data.len());
        assert!(back == data);
    }

    #[test]
    fn limits_follow_the_reference_reader() {
        assert!(check_reference_limits(&[4200; 16], 4096).is_ok());
        assert!(check_reference_limits(&[4400; 16], 4096).is_err());
        assert!(check_reference_limits(&[32900, 32900], 32768).is_ok());
        assert!(check_reference_limits(&[65546], 65536).is_err());
    }
}
