//! A FUSE filesystem with a single file whose bytes are the image (read-only, or writable over a
//! writable layer), served by this
//! process. Two transports to the kernel, one request handler:
//! - `/dev/fuse` read and write (every kernel): one session thread reads requests;
//! - FUSE over io_uring (`uring`, when the kernel offers it: `enable_uring` of the fuse module):
//!   one queue per CPU, so a request is answered on the CPU that sent it without waking a
//!   thread elsewhere, and cached reads go to the cache file through the same ring.
//!
//! How each transport compares with a plain loop device is in bench/README.md.
//!
//! Misses and large reads over `/dev/fuse` are answered when the data is there, by the engine's
//! tokio runtime, so no transport thread waits on the network and many reads are in flight at
//! once. Each such read is started on the transport thread and moves to the runtime only when
//! it first waits (`eager`): a miss's request is sent before any runtime worker wakes, and a
//! read whose bytes already arrived never leaves the thread.

mod abi;
mod eager;
mod uring;

use crate::{AttachError, AttachErrorKind};
use abi::{InHeader, Out};
use lazy_image_engine::View;
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;
use tokio::runtime::Handle;

pub const IMAGE_FILE_NAME: &str = "image";
const ROOT: u64 = 1;
const FILE: u64 = 2;
/// Attributes never change while mounted: let the kernel cache them.
const TTL_S: u64 = 3600;
/// Largest request the kernel sends (readahead of the loop device); also the payload buffer of
/// each io_uring entry.
pub(crate) const MAX_WRITE: usize = 1 << 20;
const MAX_PAGES: u16 = (MAX_WRITE / 4096) as u16;
/// Reads up to this size that hit the cache are served on the transport thread (see `read`).
const SYNC_HIT_MAX: usize = 64 << 10;
/// Set to `0` to keep to `/dev/fuse` even where the kernel offers io_uring.
pub const IO_URING_ENV: &str = "LAZY_IMAGE_FUSE_IO_URING";
/// Microseconds an io_uring queue thread polls for more work after small cache hits (default 50;
/// `0` sleeps at once, for nodes where an idle CPU matters more than warm read latency).
pub const SPIN_ENV: &str = "LAZY_IMAGE_FUSE_SPIN_US";

/// How a transport delivers an answer: `/dev/fuse`, or the io_uring entry the request came on.
trait Deliver: Send + 'static {
    /// Whether requests that take no answer (FORGET, INTERRUPT) must still be handed back.
    const HAND_BACK_UNANSWERED: bool;
    /// `error` is 0 or a negative errno; `body` is ignored with an error.
    fn deliver(&self, error: i32, body: &[u8]);
    /// The transport's own buffer for an answer of up to `len` bytes, if it has one (a ring
    /// entry's payload): an answer written there goes out by `deliver_written`, with no copy.
    fn payload(&mut self, _len: usize) -> Option<&mut [u8]> {
        None
    }
    /// Delivers the first `n` bytes of `payload` as the answer. Only transports whose
    /// `payload` hands out a buffer are ever asked to.
    fn deliver_written(&self, _n: usize) {
        self.deliver(-libc::EIO, &[]);
    }
}

/// The answer to one request, given once. Dropped unanswered (its task cancelled), it fails the
/// request with EIO rather than leaving its reader (and, over io_uring, its entry) waiting.
struct Reply<D: Deliver> {
    to: D,
    sent: bool,
}

impl<D: Deliver> Reply<D> {
    fn new(to: D) -> Self {
        Reply { to, sent: false }
    }

    fn send(mut self, error: i32, body: &[u8]) {
        self.sent = true;
        self.to.deliver(error, body);
    }

    fn payload(&mut self, len: usize) -> Option<&mut [u8]> {
        self.to.payload(len)
    }

    /// Answers with the first `n` bytes written into `payload`.
    fn send_written(mut self, n: usize) {
        self.sent = true;
        self.to.deliver_written(n);
    }

    /// For requests the kernel expects no answer to.
    fn forget(mut self) {
        self.sent = true;
        if D::HAND_BACK_UNANSWERED {
            self.to.deliver(0, &[]);
        }
    }
}

impl<D: Deliver> Drop for Reply<D> {
    fn drop(&mut self) {
        if !self.sent {
            self.to.deliver(-libc::EIO, &[]);
        }
    }
}

struct DevReply {
    dev: Arc<File>,
    unique: u64,
}

impl Deliver for DevReply {
    const HAND_BACK_UNANSWERED: bool = false;

    fn deliver(&self, error: i32, body: &[u8]) {
        let body = if error == 0 { body } else { &[] };
        let head = abi::out_header(self.unique, error, body.len());
        let iov = [
            libc::iovec { iov_base: head.as_ptr() as *mut _, iov_len: head.len() },
            libc::iovec { iov_base: body.as_ptr() as *mut _, iov_len: body.len() },
        ];
        // SAFETY: both buffers outlive the call; the fd is open while `dev` lives.
        if unsafe { libc::writev(self.dev.as_raw_fd(), iov.as_ptr(), 2) } < 0 {
            // ENOENT: the request was interrupted meanwhile, nobody waits for it.
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::debug!(error = %e, "FUSE reply not delivered");
            }
        }
    }
}

struct ImageFs {
    image: View,
    rt: Handle,
    started: u64,
}

impl ImageFs {
    fn attr(&self, out: &mut Out, ino: u64) {
        let file_mode = if self.image.writable() { 0o644 } else { 0o444 };
        let (size, mode, nlink) =
            if ino == ROOT { (0, libc::S_IFDIR | 0o555, 2) } else { (self.image.size(), libc::S_IFREG | file_mode, 1) };
        out.u64(ino).u64(size).u64(size.div_ceil(512));
        out.u64(self.started).u64(self.started).u64(self.started);
        out.u32(0).u32(0).u32(0).u32(mode).u32(nlink).u32(0).u32(0).u32(0).u32(4096).u32(0);
    }

    /// Answers one request (`arg` is its first argument: the op's header, or a LOOKUP's name).
    fn serve<D: Deliver>(&self, h: &InHeader, arg: &[u8], reply: Reply<D>) {
        let mut out = Out::default();
        let error = match h.opcode {
            abi::LOOKUP => {
                let name = arg.split(|&c| c == 0).next().unwrap_or_default();
                if h.nodeid != ROOT || name != IMAGE_FILE_NAME.as_bytes() {
                    -libc::ENOENT
                } else {
                    out.u64(FILE).u64(0).u64(TTL_S).u64(TTL_S).u32(0).u32(0);
                    self.attr(&mut out, FILE);
                    0
                }
            }
            abi::GETATTR if h.nodeid == ROOT || h.nodeid == FILE => {
                out.u64(TTL_S).u32(0).u32(0);
                self.attr(&mut out, h.nodeid);
                0
            }
            abi::GETATTR => -libc::ENOENT,
            abi::OPEN if h.nodeid != FILE => -libc::EISDIR,
            abi::OPEN if abi::u32_at(arg, 0) as i32 & libc::O_ACCMODE != libc::O_RDONLY && !self.image.writable() => -libc::EROFS,
            abi::OPEN => {
                out.u64(0).u32(abi::FOPEN_KEEP_CACHE).u32(0);
                0
            }
            abi::OPENDIR if h.nodeid != ROOT => -libc::ENOTDIR,
            abi::OPENDIR => {
                out.u64(0).u32(0).u32(0);
                0
            }
            abi::READ if h.nodeid != FILE => -libc::EINVAL,
            abi::READ => return self.read(abi::u64_at(arg, 8), abi::u32_at(arg, 16) as usize, reply),
            abi::WRITE if h.nodeid != FILE => -libc::EINVAL,
            abi::WRITE => return self.write(abi::u64_at(arg, 8), abi::u32_at(arg, 16) as usize, arg.get(abi::WRITE_IN..), reply),
            abi::FSYNC if h.nodeid == FILE && self.image.writable() => {
                let image = self.image.clone();
                return self.on_runtime(async move { image.flush().await.map(|()| Vec::new()) }, reply);
            }
            // fallocate(PUNCH_HOLE | KEEP_SIZE) or (ZERO_RANGE [| KEEP_SIZE]): what the loop device
            // sends for discard and write-zeroes; both make the range read as zeros.
            abi::FALLOCATE if h.nodeid == FILE && self.image.writable() => {
                let (offset, len, mode) = (abi::u64_at(arg, 8), abi::u64_at(arg, 16), abi::u32_at(arg, 24) as i32);
                let zeroing = mode == libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                    || mode & !libc::FALLOC_FL_KEEP_SIZE == libc::FALLOC_FL_ZERO_RANGE;
                if !zeroing {
                    -libc::EOPNOTSUPP
                } else {
                    let image = self.image.clone();
                    return self.on_runtime(async move { image.write_zeroes(offset, len).await.map(|()| Vec::new()) }, reply);
                }
            }
            abi::READDIR if h.nodeid != ROOT => -libc::ENOTDIR,
            abi::READDIR => {
                self.readdir(&mut out, abi::u64_at(arg, 8), abi::u32_at(arg, 16) as usize);
                0
            }
            abi::STATFS => {
                out.pad_to(40).u32(4096).u32(255).u32(4096).pad_to(80);
                0
            }
            abi::RELEASE | abi::RELEASEDIR | abi::FLUSH | abi::DESTROY => 0,
            // No answer is expected to these.
            abi::FORGET | abi::BATCH_FORGET | abi::INTERRUPT => return reply.forget(),
            _ => -libc::ENOSYS,
        };
        reply.send(error, &out.0);
    }

    fn read<D: Deliver>(&self, offset: u64, size: usize, reply: Reply<D>) {
        let size = size.min(MAX_WRITE);
        // A small read whose chunks are all cached is answered on this thread: a hop to the
        // runtime costs a thread wakeup, a large share of a warm 4 KiB read. Larger reads (the
        // loop device's readahead) still go to the runtime: served one at a time here they
        // starved sequential reads of parallel disk reads.
        if size <= SYNC_HIT_MAX {
            let mut buf = vec![0u8; size];
            match self.image.read_cached_into(offset, &mut buf) {
                Ok(Some(n)) => return reply.send(0, &buf[..n]),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(offset, size, error = %e.report(), "cache read failed");
                    return reply.send(-e.kind().errno(), &[]);
                }
            }
        }
        self.read_on_runtime(offset, size, reply);
    }

    /// A write from the loop device: done here when it needs no wait, else on the runtime (with
    /// a copy of `data`, which is the transport's until the reply).
    pub(super) fn write<D: Deliver>(&self, offset: u64, size: usize, data: Option<&[u8]>, reply: Reply<D>) {
        let Some(data) = data.and_then(|d| d.get(..size)) else { return reply.send(-libc::EINVAL, &[]) };
        let mut out = Out::default();
        out.u32(size as u32).u32(0);
        match self.image.write_now(offset, data) {
            Some(Ok(())) => reply.send(0, &out.0),
            Some(Err(e)) => {
                tracing::warn!(offset, size, error = %e.report(), "image write failed");
                reply.send(-e.kind().errno(), &[])
            }
            None => {
                let (image, data) = (self.image.clone(), data.to_vec());
                self.on_runtime(async move { image.write(offset, &data).await.map(|()| out.0) }, reply)
            }
        }
    }

    /// Answers with what `work` gives (the answer's body), done on the runtime.
    fn on_runtime<D: Deliver>(
        &self,
        work: impl std::future::Future<Output = lazy_image_engine::Result<Vec<u8>>> + Send + 'static,
        reply: Reply<D>,
    ) {
        self.rt.spawn(async move {
            match work.await {
                Ok(body) => reply.send(0, &body),
                Err(e) => {
                    tracing::warn!(error = %e.report(), "image request failed");
                    reply.send(-e.kind().errno(), &[]);
                }
            }
        });
    }

    /// Serves a read on the runtime: a miss (fetched from the origin) or a large read.
    fn read_on_runtime<D: Deliver>(&self, offset: u64, size: usize, reply: Reply<D>) {
        let image = self.image.clone();
        let task = async move {
            let mut reply = reply;
            // Straight into the transport's buffer where it has one (io_uring); else a copy.
            let read = match reply.payload(size) {
                Some(buf) => image.read_into(offset, buf).await.map(|n| (n, None)),
                None => image.read(offset, size as u64).await.map(|b| (b.len(), Some(b))),
            };
            match read {
                Ok((n, None)) => reply.send_written(n),
                Ok((_, Some(bytes))) => reply.send(0, &bytes),
                Err(e) => {
                    tracing::warn!(offset, size, error = %e.report(), "image read failed");
                    reply.send(-e.kind().errno(), &[]);
                }
            }
        };
        // Started on this thread: a random reader's miss has its request out at once, and a
        // sequential reader's read whose bytes have already arrived is copied and answered here,
        // with no runtime worker woken and no wakeup of this thread to commit the answer.
        eager::spawn(&self.rt, task);
    }

    fn readdir(&self, out: &mut Out, offset: u64, size: usize) {
        let entries = [(ROOT, libc::DT_DIR, "."), (ROOT, libc::DT_DIR, ".."), (FILE, libc::DT_REG, IMAGE_FILE_NAME)];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            let len = (24 + name.len()).next_multiple_of(8);
            if out.0.len() + len > size {
                break;
            }
            out.u64(*ino).u64(i as u64 + 1).u32(name.len() as u32).u32(*kind as u32);
            out.0.extend_from_slice(name.as_bytes());
            let end = out.0.len().next_multiple_of(8);
            out.pad_to(end);
        }
    }

    /// The INIT answer: the features this server wants of those the kernel offers (`arg` is
    /// `fuse_init_in`). Returns the body and whether io_uring was agreed.
    fn init(&self, arg: &[u8], want_uring: bool) -> (Out, bool) {
        let (minor, max_readahead) = (abi::u32_at(arg, 4), abi::u32_at(arg, 8));
        let offered = abi::u32_at(arg, 12) as u64 | (abi::u32_at(arg, 16) as u64) << 32;
        let mut want = abi::ASYNC_READ | abi::BIG_WRITES | abi::ASYNC_DIO | abi::MAX_PAGES | abi::INIT_EXT;
        if want_uring {
            want |= abi::OVER_IO_URING;
        }
        let flags = want & offered;
        let mut out = Out::default();
        out.u32(7).u32(minor.min(42)).u32(max_readahead.min(MAX_WRITE as u32)).u32(flags as u32);
        out.u16(64).u16(48).u32(MAX_WRITE as u32).u32(1).u16(MAX_PAGES).u16(0).u32((flags >> 32) as u32);
        out.pad_to(64);
        (out, flags & abi::OVER_IO_URING != 0)
    }
}

/// What a later process needs to serve a running FUSE session again (`FuseExport::resume`),
/// kept with the session's `/dev/fuse` descriptor by whoever holds it meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuseSessionInfo {
    /// The FUSE filesystem's device number: names the kernel's connection, and is what the
    /// loop device on the image file reads from.
    pub dev: u64,
    /// The times the files show: the kernel caches attributes, they must not change.
    pub started: u64,
}

/// A running FUSE export of one image. `stop` ends it.
pub struct FuseExport {
    dir: PathBuf,
    /// Mounted by this process, in its namespace (false for a session taken over).
    mounted_here: bool,
    dev: Arc<File>,
    info: FuseSessionInfo,
    session: Option<JoinHandle<()>>,
    rings: Arc<Mutex<Option<uring::Rings>>>,
}

impl FuseExport {
    /// Mounts the image's FUSE filesystem at `dir` and serves it. With `handover`, the session is
    /// meant to outlive this process (its descriptor passed to a holder, `handover`):
    /// requests then come over `/dev/fuse` only, which the kernel can send again to the next
    /// server; io_uring queues die with their process and take their requests along.
    pub fn start(image: View, dir: &Path, rt: Handle, handover: bool) -> Result<Self, AttachError> {
        let writable = image.writable();
        std::fs::create_dir_all(dir).map_err(|e| AttachError::os(format!("creating {}", dir.display()), e))?;
        if crate::is_mountpoint(dir)? {
            // Left behind by a process that died: it cannot be serving anyone now.
            crate::unmount(dir)?;
        }
        let unsupported = |what: String, e: std::io::Error| {
            let mut err = AttachError::os(what, e);
            err.kind = AttachErrorKind::Unsupported;
            err
        };
        let dev =
            std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").map_err(|e| unsupported("opening /dev/fuse".into(), e))?;
        let dev = Arc::new(dev);
        mount_fuse(&dev, dir, writable)
            .map_err(|e| unsupported(format!("mounting FUSE at {} (is /dev/fuse available?)", dir.display()), e))?;
        let started = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let want_uring = !handover && std::env::var(IO_URING_ENV).map_or(true, |v| v != "0");
        let mut export = FuseExport {
            dir: dir.to_path_buf(),
            mounted_here: true,
            dev,
            info: FuseSessionInfo { dev: 0, started },
            session: None,
            rings: Arc::new(Mutex::new(None)),
        };
        if let Err(e) = export.spawn_session(image, rt, want_uring) {
            let _ = crate::mount::unmount_own(dir, true);
            return Err(e);
        }
        // The mount's device number, once the session answers (stat waits for INIT).
        match std::fs::metadata(dir) {
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                export.info.dev = m.dev();
            }
            Err(e) => {
                export.stop();
                return Err(AttachError::os(format!("reading the FUSE mount at {}", dir.display()), e));
            }
        }
        Ok(export)
    }

    /// Serves a session another process started and left running (its `/dev/fuse` descriptor
    /// `fd` kept by a holder): the kernel is asked to send again what the dead server had read
    /// but not answered, so readers it held get their bytes. `dir` is where that process had
    /// mounted it (in its own namespace; nothing is mounted there in ours).
    pub fn resume(image: View, fd: std::os::fd::OwnedFd, info: FuseSessionInfo, dir: &Path, rt: Handle) -> Result<Self, AttachError> {
        let dev = Arc::new(File::from(fd));
        let head = abi::out_header(0, abi::NOTIFY_RESEND, 0);
        // SAFETY: `head` is valid for its length; the fd is open while `dev` lives.
        if unsafe { libc::write(dev.as_raw_fd(), head.as_ptr().cast(), head.len()) } < 0 {
            let e = std::io::Error::last_os_error();
            let kind = if e.raw_os_error() == Some(libc::EINVAL) { AttachErrorKind::Unsupported } else { AttachErrorKind::Io };
            let why = match kind {
                AttachErrorKind::Unsupported => "this kernel cannot send requests again to a new FUSE server (Linux 6.9 or later can)",
                _ => "the FUSE connection is gone",
            };
            return Err(AttachError::new(kind, format!("taking over the FUSE session of {}: {why}: {e}", dir.display())));
        }
        let mut export =
            FuseExport { dir: dir.to_path_buf(), mounted_here: false, dev, info, session: None, rings: Arc::new(Mutex::new(None)) };
        export.spawn_session(image, rt, false)?;
        Ok(export)
    }

    fn spawn_session(&mut self, image: View, rt: Handle, want_uring: bool) -> Result<(), AttachError> {
        let fs = Arc::new(ImageFs { image, rt, started: self.info.started });
        let (dev, rings) = (self.dev.clone(), self.rings.clone());
        let s = std::thread::Builder::new()
            .name("lazy-image-fuse".into())
            .spawn(move || session(fs, dev, want_uring, rings))
            .map_err(|e| AttachError::os("starting the FUSE session thread", e))?;
        self.session = Some(s);
        Ok(())
    }

    pub fn image_path(&self) -> PathBuf {
        self.dir.join(IMAGE_FILE_NAME)
    }

    /// True when requests come over io_uring queues rather than `/dev/fuse` reads.
    pub fn uses_io_uring(&self) -> bool {
        self.rings.lock().is_ok_and(|r| r.is_some())
    }

    /// A second descriptor of the session, for a holder that keeps it open while no process
    /// serves it, and what a later process needs to take it over.
    pub fn handover(&self) -> std::io::Result<(std::os::fd::OwnedFd, FuseSessionInfo)> {
        Ok((self.dev.try_clone()?.into(), self.info))
    }

    /// Ends the session: unmounts it (the kernel then ends the connection) or, for a session
    /// taken over, whose mount went with the namespace of the process that made it, aborts the
    /// connection; then waits for the transport threads.
    pub fn stop(mut self) {
        let conn = libc::minor(self.info.dev);
        if self.mounted_here {
            // Mounted in this process's namespace, which is private for the node plugin.
            if let Err(e) = crate::mount::unmount_own(&self.dir, false) {
                tracing::warn!(error = %e, "unmounting the FUSE export; detaching it");
                let _ = crate::mount::unmount_own(&self.dir, true);
                // A detached mount keeps its connection while used: end it so the threads return.
                abort_connection(conn);
            }
        } else {
            // Its loop device is gone by now, and with it the last user of the filesystem;
            // where fusectl is mounted, end the connection at once.
            abort_connection(conn);
        }
        if let Some(r) = self.rings.lock().ok().and_then(|mut r| r.take()) {
            r.stop();
        }
        if let Some(s) = self.session.take() {
            if self.mounted_here {
                let _ = s.join();
                return;
            }
            // A taken-over session ends when its superblock goes, which a late user of the
            // loop device may delay: do not hang the caller on it.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !s.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if s.is_finished() {
                let _ = s.join();
            } else {
                tracing::warn!(dir = %self.dir.display(), "the FUSE session goes on after stop; it ends with its last user");
            }
        }
    }
}

/// Ends FUSE connection `conn` through fusectl, where it is mounted.
fn abort_connection(conn: u32) {
    let _ = std::fs::write(format!("/sys/fs/fuse/connections/{conn}/abort"), "1");
}

/// Mounts a FUSE filesystem served over `dev` at `dir`, read-only unless `writable`.
fn mount_fuse(dev: &File, dir: &Path, writable: bool) -> std::io::Result<()> {
    let invalid = |_| std::io::Error::from_raw_os_error(libc::EINVAL);
    let target = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(invalid)?;
    let data = CString::new(format!("fd={},rootmode=40000,user_id=0,group_id=0", dev.as_raw_fd())).map_err(invalid)?;
    let flags = if writable { 0 } else { libc::MS_RDONLY } | libc::MS_NOSUID | libc::MS_NODEV;
    // SAFETY: NUL-terminated strings that outlive the call.
    let r = unsafe { libc::mount(c"lazy-image".as_ptr(), target.as_ptr(), c"fuse.lazy-image".as_ptr(), flags, data.as_ptr().cast()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The `/dev/fuse` session: answers INIT, starts the io_uring queues when agreed, and serves
/// what comes over `/dev/fuse` (everything without io_uring; with it, what the kernel sends
/// before the queues are registered, and FORGET and INTERRUPT) until the connection ends.
fn session(fs: Arc<ImageFs>, dev: Arc<File>, want_uring: bool, rings: Arc<Mutex<Option<uring::Rings>>>) {
    // The kernel refuses reads into a buffer that could not take the largest write.
    let mut buf = vec![0u8; MAX_WRITE + 4096];
    loop {
        // SAFETY: `buf` is valid for `buf.len()` bytes; the fd is open while `dev` lives.
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // Interrupted, or a request that was withdrawn before we read it.
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT) => continue,
                // The filesystem was unmounted or the connection aborted.
                Some(libc::ENODEV) => return,
                _ => {
                    tracing::warn!(error = %e, "reading /dev/fuse failed; FUSE session ends");
                    return;
                }
            }
        }
        let req = &buf[..n as usize];
        let Some(h) = InHeader::parse(req) else { continue };
        let arg = &req[abi::IN_HEADER..];
        let reply = Reply::new(DevReply { dev: dev.clone(), unique: h.unique });
        if h.opcode == abi::INIT {
            let (out, uring) = fs.init(arg, want_uring);
            reply.send(0, &out.0);
            if uring {
                match uring::Rings::start(fs.clone(), dev.clone()) {
                    Ok(r) => {
                        tracing::debug!("FUSE requests come over io_uring");
                        if let Ok(mut slot) = rings.lock() {
                            *slot = Some(r);
                        }
                    }
                    // The kernel keeps sending over /dev/fuse until every queue is registered.
                    Err(e) => tracing::warn!(error = %e, "FUSE over io_uring not available; using /dev/fuse"),
                }
            }
            continue;
        }
        fs.serve(&h, arg, reply);
        if h.opcode == abi::DESTROY {
            return;
        }
    }
}
