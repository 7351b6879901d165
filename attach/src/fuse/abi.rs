//! The FUSE wire format this server speaks (Linux `include/uapi/linux/fuse.h`, protocol 7.x):
//! only the requests a single file holding an image needs (read-only, or a writable layer's). All fields little-endian, at fixed offsets.

pub const IN_HEADER: usize = 40;
pub const OUT_HEADER: usize = 16;

pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;

/// `fuse_write_in`: the size of the header before a WRITE's bytes.
pub const WRITE_IN: usize = 40;

// INIT flags (flags | flags2 << 32).
pub const ASYNC_READ: u64 = 1 << 0;
pub const BIG_WRITES: u64 = 1 << 5;
/// Direct I/O (the loop device's) sent as parallel background requests, not one at a time.
pub const ASYNC_DIO: u64 = 1 << 15;
pub const MAX_PAGES: u64 = 1 << 22;
pub const INIT_EXT: u64 = 1 << 30;
pub const OVER_IO_URING: u64 = 1 << 41;

/// A notification (`unique` 0) asking the kernel to send again every request a server read and
/// did not answer (Linux 6.9+): what a server that took over from a dead one needs.
pub const NOTIFY_RESEND: i32 = 7;

/// FOPEN_KEEP_CACHE: the file's content is immutable, keep page cache across opens.
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;

// FUSE-over-io_uring: each ring entry has a 288-byte header buffer and a payload buffer.
pub const RING_HEADER: usize = 288;
/// Offset of `struct fuse_uring_req_header.op_in` (the request's first argument).
pub const RING_OP_IN: usize = 128;
/// Offsets of `ring_ent_in_out.commit_id` and `.payload_sz`.
pub const RING_COMMIT_ID: usize = 256 + 8;
pub const RING_PAYLOAD_SZ: usize = 256 + 16;
pub const URING_CMD_REGISTER: u32 = 1;
pub const URING_CMD_COMMIT_AND_FETCH: u32 = 2;

pub fn u32_at(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4).map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

pub fn u64_at(b: &[u8], o: usize) -> u64 {
    b.get(o..o + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

/// The fixed part of every request.
#[derive(Debug, Clone, Copy)]
pub struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Option<Self> {
        (b.len() >= IN_HEADER).then(|| InHeader { opcode: u32_at(b, 4), unique: u64_at(b, 8), nodeid: u64_at(b, 16) })
    }
}

/// Appends little-endian fields to a reply body.
#[derive(Default)]
pub struct Out(pub Vec<u8>);

impl Out {
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn pad_to(&mut self, len: usize) -> &mut Self {
        self.0.resize(len, 0);
        self
    }
}

/// `struct fuse_out_header` for a reply with `body` bytes.
pub fn out_header(unique: u64, error: i32, body: usize) -> [u8; OUT_HEADER] {
    let mut h = [0u8; OUT_HEADER];
    h[0..4].copy_from_slice(&((OUT_HEADER + body) as u32).to_le_bytes());
    h[4..8].copy_from_slice(&error.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h
}
