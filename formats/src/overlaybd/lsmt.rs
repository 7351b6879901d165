//! LSMT, OverlayBD's layer file (containerd/overlaybd `src/overlaybd/lsmt/`): a 4 KiB header,
//! the layer's data, a sorted index of extents mapping device sectors to sectors of this file
//! (or marking them zeroed), and a 4 KiB trailer that repeats the header with the index's place.
//! A stack of layers reads as one device: the topmost layer that maps a sector wins, and
//! sectors no layer maps read as zeros.

use super::{le32, le64, read_full};
use crate::{corrupt, refuse};
use lazy_image_engine::Result;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, Write};

pub const SPACE: u64 = 4096;
pub const SECTOR: u64 = 512;
pub const MAGIC0: [u8; 8] = *b"LSMT\0\x01\x02\0";
pub const MAGIC1: [u8; 16] = [0x65, 0x7e, 0x63, 0xd2, 0x94, 0x44, 0x08, 0x4c, 0xa2, 0xd2, 0xc8, 0xec, 0x4f, 0xcf, 0xae, 0x8a];
/// Bytes of the header struct (without its padding to 4 KiB).
const STRUCT_SIZE: u32 = 390;

const FLAG_HEADER: u32 = 1 << 0;
const FLAG_DATA: u32 = 1 << 1;
const FLAG_SEALED: u32 = 1 << 2;
const FLAG_SPARSE_RW: u32 = 1 << 4;

/// The reference's bound on a read-only layer's index (records of 16 bytes).
pub const MAX_INDEX_RECORDS: u64 = 1_000_000;
/// The reference's bound on a stack.
pub const MAX_LAYERS: usize = 255;
/// Longest extent one record holds, in sectors.
pub const MAX_EXTENT: u64 = (1 << 14) - 1;
const INVALID_OFFSET: u64 = (1 << 50) - 1;

/// True when `head` starts with the LSMT magic.
pub fn has_magic(head: &[u8]) -> bool {
    head.len() >= 24 && head[..8] == MAGIC0 && head[8..24] == MAGIC1
}

/// A sealed layer's trailer, checked against its header and file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub index_offset: u64,
    pub index_records: u64,
    /// Bytes of the device; 0 in a layer that leaves it to the layers beneath.
    pub virtual_size: u64,
    pub uuid: String,
    pub parent_uuid: String,
}

fn uuid_text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).trim().to_string();
    if s.bytes().all(|c| c == b'0' || c == b'-') {
        String::new()
    } else {
        s
    }
}

/// Parses a layer from its first and last 4 KiB (`file_size` bytes in all).
pub fn parse_layer(head: &[u8], tail: &[u8], file_size: u64, what: &str) -> Result<Layer> {
    if head.len() < SPACE as usize || !has_magic(head) {
        return Err(refuse(what, "not an OverlayBD layer (no LSMT magic)"));
    }
    let hflags = le32(head, 28);
    if hflags & FLAG_HEADER == 0 {
        return Err(corrupt(what, "its header is marked as a trailer"));
    }
    if hflags & FLAG_DATA == 0 {
        return Err(refuse(what, "an LSMT index file (the index of a writable layer) is not supported: commit the layer first"));
    }
    if file_size < 2 * SPACE || tail.len() < SPACE as usize || !has_magic(tail) {
        return Err(refuse(what, "the layer has no trailer (not sealed: commit it first)"));
    }
    let flags = le32(tail, 28);
    if flags & FLAG_HEADER != 0 || flags & FLAG_DATA == 0 || flags & FLAG_SEALED == 0 {
        return Err(refuse(what, "the trailer is not a sealed data layer's (commit the layer first)"));
    }
    if flags & FLAG_SPARSE_RW != 0 {
        return Err(refuse(what, "sparse writable layers are not supported"));
    }
    let (version, sub) = (tail[132], tail[133]);
    if version > 1 {
        return Err(refuse(what, format!("LSMT version {version}.{sub} is not supported (1 is)")));
    }
    let l = Layer {
        index_offset: le64(tail, 32),
        index_records: le64(tail, 40),
        virtual_size: le64(tail, 48),
        uuid: uuid_text(&tail[56..93]),
        parent_uuid: uuid_text(&tail[93..130]),
    };
    if l.index_records > MAX_INDEX_RECORDS {
        return Err(refuse(what, format!("an index of {} records is more than {MAX_INDEX_RECORDS}", l.index_records)));
    }
    let trailer_at = file_size - SPACE;
    if l.index_offset < SPACE || l.index_offset.checked_add(l.index_records * 16).is_none_or(|e| e > trailer_at) {
        return Err(corrupt(what, "its index lies outside the file"));
    }
    if l.virtual_size > INVALID_OFFSET * SECTOR {
        return Err(corrupt(what, format!("virtual size {} is too large", l.virtual_size)));
    }
    Ok(l)
}

/// One record of a layer's index, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub offset: u64,
    pub len: u64,
    /// Where the data is in the layer's file; meaningless when zeroed.
    pub moffset: u64,
    pub zeroed: bool,
}

impl Mapping {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    fn to_bytes(self) -> [u8; 16] {
        let lo = self.offset | (self.len << 50);
        let hi = self.moffset | (u64::from(self.zeroed) << 55);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&lo.to_le_bytes());
        b[8..].copy_from_slice(&hi.to_le_bytes());
        b
    }
}

/// Parses and checks a layer's index: records in order, not overlapping, their data inside the
/// layer's data section. The padding records the writer adds are dropped.
pub fn parse_index(raw: &[u8], l: &Layer, what: &str) -> Result<Vec<Mapping>> {
    let data_end = l.index_offset / SECTOR;
    let mut out: Vec<Mapping> = Vec::new();
    for (i, r) in raw.chunks_exact(16).enumerate() {
        let (lo, hi) = (le64(r, 0), le64(r, 8));
        let m = Mapping { offset: lo & INVALID_OFFSET, len: lo >> 50, moffset: hi & ((1 << 55) - 1), zeroed: (hi >> 55) & 1 == 1 };
        if m.offset == INVALID_OFFSET || m.len == 0 {
            continue;
        }
        if out.last().is_some_and(|p| p.end() > m.offset) {
            return Err(corrupt(what, format!("index record {i} is out of order or overlaps the one before")));
        }
        if !m.zeroed && (m.moffset < SPACE / SECTOR || m.moffset + m.len > data_end) {
            return Err(corrupt(what, format!("index record {i} maps outside the layer's data")));
        }
        out.push(m);
    }
    Ok(out)
}

/// One extent of a merged stack: which layer (index into the stack, bottom first) serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub layer: u16,
    pub moffset: u64,
    pub zeroed: bool,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Merges the layers' indexes (bottom first) into one sorted list: each sector from the
/// topmost layer that maps it.
pub fn merge(layers: &[Vec<Mapping>]) -> Vec<Extent> {
    let mut merged: Vec<Extent> = Vec::new();
    for (li, maps) in layers.iter().enumerate().rev() {
        let mut pieces = Vec::new();
        let mut j = 0usize;
        for m in maps {
            while j < merged.len() && merged[j].end() <= m.offset {
                j += 1;
            }
            let mut pos = m.offset;
            let mut k = j;
            while k < merged.len() && merged[k].offset < m.end() {
                if merged[k].offset > pos {
                    pieces.push(piece(m, li, pos, merged[k].offset));
                }
                pos = pos.max(merged[k].end());
                k += 1;
            }
            if pos < m.end() {
                pieces.push(piece(m, li, pos, m.end()));
            }
        }
        merged.extend(pieces);
        // Two sorted runs: the sort merges them.
        merged.sort_by_key(|e| e.offset);
    }
    merged
}

fn piece(m: &Mapping, layer: usize, from: u64, to: u64) -> Extent {
    let moffset = if m.zeroed { 0 } else { m.moffset + (from - m.offset) };
    Extent { offset: from, len: to - from, layer: layer as u16, moffset, zeroed: m.zeroed }
}

/// Builds one layer file from a flat image: every 4 KiB block that differs from `base` (zeros
/// without one) becomes data, a block that is zero in the image but not in the base becomes a
/// zeroed extent, and equal blocks are left to the layers beneath. The layer's UUID names the
/// image's contents (the first 16 bytes of its SHA-256) and its parent UUID the base's, so the
/// layer converted from `base` is the one it stacks on.
pub fn write_layer<W: Write + Seek>(image: &mut dyn Read, base: Option<&mut dyn Read>, out: &mut W) -> std::io::Result<WrittenLayer> {
    const BLOCK: usize = 4096;
    let start = out.stream_position()?;
    out.write_all(&[0u8; SPACE as usize])?;
    let (mut buf, mut bbuf) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let (mut hash, mut bhash) = (Sha256::new(), Sha256::new());
    let mut base = base;
    let mut maps: Vec<Mapping> = Vec::new();
    let (mut size, mut moffset) = (0u64, SPACE / SECTOR);
    let mut base_left = true;
    loop {
        let n = read_full(image, &mut buf)?;
        let bn = match (&mut base, base_left) {
            (Some(b), true) => read_full(*b, &mut bbuf)?,
            _ => 0,
        };
        bhash.update(&bbuf[..bn]);
        base_left &= bn == BLOCK;
        if n == 0 {
            // The rest of the base only feeds its hash.
            if let (Some(b), true) = (&mut base, base_left) {
                std::io::copy(*b, &mut bhash)?;
            }
            break;
        }
        hash.update(&buf[..n]);
        let sectors = (n as u64).div_ceil(SECTOR);
        let padded = (sectors * SECTOR) as usize;
        buf[n..padded].fill(0);
        if bn < padded {
            bbuf[bn..padded].fill(0);
        }
        let lba = size / SECTOR;
        size += n as u64;
        // Bytes past the image's end are never read, whatever the base holds there.
        let is_zero = buf[..n].iter().all(|&b| b == 0);
        let same = buf[..n] == bbuf[..n];
        if !same {
            let zeroed = is_zero;
            if !zeroed {
                out.write_all(&buf[..padded])?;
            }
            match maps.last_mut() {
                Some(m)
                    if m.zeroed == zeroed
                        && m.end() == lba
                        && m.len + sectors <= MAX_EXTENT
                        && (zeroed || m.moffset + m.len == moffset) =>
                {
                    m.len += sectors
                }
                _ => maps.push(Mapping { offset: lba, len: sectors, moffset, zeroed }),
            }
            if !zeroed {
                moffset += sectors;
            }
        }
        if n < BLOCK {
            if let (Some(b), true) = (&mut base, base_left) {
                std::io::copy(*b, &mut bhash)?;
            }
            break;
        }
    }
    let index_offset = moffset * SECTOR;
    // The reference pads the index to whole 4 KiB with invalid records.
    let per_page = (SPACE / 16) as usize;
    let records = maps.len().div_ceil(per_page).max(1) * per_page;
    for i in 0..records {
        let m = maps.get(i).copied().unwrap_or(Mapping { offset: INVALID_OFFSET, len: 0, moffset: 0, zeroed: false });
        out.write_all(&m.to_bytes())?;
    }
    let uuid = uuid_from(&hash.finalize());
    let parent_uuid = if base.is_some() { uuid_from(&bhash.finalize()) } else { String::new() };
    let l = Layer { index_offset, index_records: records as u64, virtual_size: size, uuid, parent_uuid };
    out.write_all(&ht_bytes(&l, FLAG_DATA | FLAG_SEALED))?;
    let end = out.stream_position()?;
    out.seek(std::io::SeekFrom::Start(start))?;
    out.write_all(&ht_bytes(&Layer { index_offset: 0, index_records: 0, ..l.clone() }, FLAG_HEADER | FLAG_DATA | FLAG_SEALED))?;
    out.seek(std::io::SeekFrom::Start(end))?;
    Ok(WrittenLayer { layer: l, extents: maps.len(), bytes: end - start })
}

/// What `write_layer` wrote.
#[derive(Debug, Clone)]
pub struct WrittenLayer {
    pub layer: Layer,
    pub extents: usize,
    pub bytes: u64,
}

fn uuid_from(digest: &[u8]) -> String {
    let h = hex::encode(&digest[..16]);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

fn ht_bytes(l: &Layer, flags: u32) -> [u8; SPACE as usize] {
    let mut b = [0u8; SPACE as usize];
    b[..8].copy_from_slice(&MAGIC0);
    b[8..24].copy_from_slice(&MAGIC1);
    b[24..28].copy_from_slice(&STRUCT_SIZE.to_le_bytes());
    b[28..32].copy_from_slice(&flags.to_le_bytes());
    b[32..40].copy_from_slice(&l.index_offset.to_le_bytes());
    b[40..48].copy_from_slice(&l.index_records.to_le_bytes());
    b[48..56].copy_from_slice(&l.virtual_size.to_le_bytes());
    b[56..56 + l.uuid.len()].copy_from_slice(l.uuid.as_bytes());
    b[93..93 + l.parent_uuid.len()].copy_from_slice(l.parent_uuid.as_bytes());
    b[132] = 1;
    b[133] = 1;
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(offset: u64, len: u64, moffset: u64) -> Mapping {
        Mapping { offset, len, moffset, zeroed: false }
    }

    #[test]
    fn the_top_layer_wins_and_gaps_fill_from_below() {
        let bottom = vec![m(0, 100, 8)];
        let middle = vec![Mapping { offset: 10, len: 10, moffset: 0, zeroed: true }, m(50, 10, 8)];
        let top = vec![m(15, 40, 8)];
        let e = merge(&[bottom, middle, top]);
        let got: Vec<(u64, u64, u16, u64, bool)> = e.iter().map(|e| (e.offset, e.len, e.layer, e.moffset, e.zeroed)).collect();
        assert_eq!(
            got,
            vec![(0, 10, 0, 8, false), (10, 5, 1, 0, true), (15, 40, 2, 8, false), (55, 5, 1, 13, false), (60, 40, 0, 68, false)]
        );
    }

    #[test]
    fn records_round_trip_through_their_bit_fields() {
        let x = Mapping { offset: (1 << 50) - 2, len: MAX_EXTENT, moffset: (1 << 55) - 1, zeroed: true };
        let b = x.to_bytes();
        let l = Layer { index_offset: 1 << 62, index_records: 1, virtual_size: 0, uuid: String::new(), parent_uuid: String::new() };
        assert_eq!(parse_index(&b, &l, "t").unwrap(), vec![x]);
    }
}
