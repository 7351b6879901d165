//! One ublk queue thread: a tag per in-flight request, each an async task on a local executor
//! driven by the queue's io_uring. Reads whose chunks are cached are read from the cache file
//! through the same ring, so a slow disk never stalls the other tags. Misses are handed to the
//! engine's tokio runtime (queue threads have no tokio I/O or timer drivers) and the task waits
//! on a oneshot; the runtime writes an eventfd that this ring always has a read pending on, so a
//! finished fetch wakes the ring. Large cached reads are not read at all: the commit points the
//! driver at the cache file's pages (see `window`). A writable device's writes are fetched on
//! request (NEED_GET_DATA): a rewrite straight into the writable layer's mapped file.

use super::window::{Mapped, Windows};
use lazy_image_engine::{Error as EngineError, ReadPlan, View};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkUringData};
use std::cell::OnceCell;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use tokio::runtime::Handle;

/// The single place an engine error becomes a ublk completion: a negative errno.
fn ublk_errno(e: &EngineError) -> i32 {
    -e.kind().errno()
}

/// Wakes a queue thread from another thread.
pub(super) struct Doorbell(OwnedFd);

impl Doorbell {
    fn new() -> std::io::Result<Self> {
        // Blocking on purpose: io_uring then waits for a write instead of failing with EAGAIN.
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(Doorbell(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ring(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a valid buffer to an eventfd we own. A failed write can only
        // mean the counter is saturated, which already guarantees a wakeup.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

pub(super) struct QueueContext {
    pub image: View,
    pub rt: Handle,
}

/// Runs queue `qid` until the device stops. Called by libublk on a thread of its own.
pub(super) fn serve_queue(qid: u16, dev: &UblkDev, ctx: &QueueContext) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(qid, error = %e, "ublk queue setup failed");
            return;
        }
    };
    let bell = match Doorbell::new() {
        Ok(b) => Arc::new(b),
        Err(e) => {
            tracing::error!(qid, error = %e, "eventfd for the ublk queue failed");
            return;
        }
    };
    let exe = smol::LocalExecutor::new();
    let windows = Rc::new(OnceCell::new());
    let mut tasks = Vec::new();
    for tag in 0..dev.dev_info.queue_depth {
        let q = q.clone();
        let bell = bell.clone();
        let windows = windows.clone();
        tasks.push(exe.spawn(async move {
            match io_task(&q, tag, ctx, &bell, &windows).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!(qid, tag, error = %e, "ublk io task failed"),
            }
        }));
    }
    // Not in `tasks`: it never finishes by itself and must not keep the queue alive.
    exe.spawn(doorbell_task(bell.clone())).detach();
    smol::block_on(exe.run(async {
        let run_ops = || while exe.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            tracing::error!(qid, error = %e, "ublk queue event loop failed");
        }
    }));
}

/// Reads a planned range of the cache file (`fd`): straight away when the page cache has it (no
/// extra trip around the ring), otherwise through this queue's ring so a disk read never stalls
/// the other tags.
async fn read_cache(fd: std::os::fd::RawFd, offset: u64, dst: &mut [u8]) -> Result<(), i32> {
    let mut done = read_nowait(fd, offset, dst);
    while done < dst.len() {
        let rest = &mut dst[done..];
        let sqe =
            io_uring::opcode::Read::new(io_uring::types::Fd(fd), rest.as_mut_ptr(), rest.len() as u32).offset(offset + done as u64).build();
        match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
            Ok(r) if r > 0 => done += r as usize,
            Ok(0) => {
                tracing::error!(offset, "cache file ended early");
                return Err(-libc::EIO);
            }
            Ok(r) if r == -libc::EINTR || r == -libc::EAGAIN => {}
            Ok(r) => {
                tracing::error!(offset, errno = -r, "reading the cache file failed");
                return Err(-libc::EIO);
            }
            Err(_) => return Err(-libc::EIO),
        }
    }
    Ok(())
}

/// Copies what the page cache already holds, never blocking; returns the bytes read. On a
/// filesystem that cannot say whether a read would block (EOPNOTSUPP, e.g. tmpfs, whose pages
/// are memory anyway) it reads plainly.
fn read_nowait(fd: std::os::fd::RawFd, offset: u64, dst: &mut [u8]) -> usize {
    let mut done = 0usize;
    let mut flags = libc::RWF_NOWAIT;
    while done < dst.len() {
        let iov = libc::iovec { iov_base: dst[done..].as_mut_ptr().cast(), iov_len: dst.len() - done };
        // SAFETY: one iovec describing the unfilled tail of `dst`, valid for the call.
        let n = unsafe { libc::preadv2(fd, &iov, 1, (offset + done as u64) as libc::off_t, flags) };
        if n < 0 && flags != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
            flags = 0;
            continue;
        }
        if n <= 0 {
            break; // EAGAIN (not cached), or an error the ring path will report
        }
        done += n as usize;
    }
    done
}

/// Keeps one read of the eventfd in flight on this queue's ring.
async fn doorbell_task(bell: Arc<Doorbell>) {
    // The kernel writes here whenever a read completes, possibly after this task is dropped at
    // queue shutdown: eight leaked bytes per queue keep that write harmless.
    let buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
    loop {
        let sqe = io_uring::opcode::Read::new(io_uring::types::Fd(bell.0.as_raw_fd()), buf.as_mut_ptr(), 8).build();
        match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
            Ok(r) if r >= 0 || r == -libc::EINTR || r == -libc::EAGAIN => {}
            Ok(r) => {
                tracing::error!(errno = -r, "reading the queue doorbell failed");
                return;
            }
            Err(_) => return,
        }
    }
}

/// The queue's windows of the cache file, made on its first planned file read.
type QueueWindows = Rc<OnceCell<Option<Windows>>>;

/// Cached reads at least this large map their window if it is not mapped yet; smaller ones use a
/// window only if one is there already (random small reads over a large image would otherwise
/// keep remapping windows), else they are read into the tag's buffer.
const MAPPED_MIN: usize = 64 << 10;

async fn io_task(q: &UblkQueue<'_>, tag: u16, ctx: &QueueContext, bell: &Arc<Doorbell>, windows: &QueueWindows) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    // What the fetch said: a write's bytes are in `buf`, or (NEED_GET_DATA) still to be asked for.
    let mut fetched = q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf)).await?;
    loop {
        let (res, mapped) = handle_io(q, tag, fetched, buf.as_mut_slice(), ctx, bell, windows).await;
        // `mapped` lives until the commit's future resolves, which is after the driver copied
        // from it (the copy happens when the commit is submitted).
        let desc = match &mapped {
            Some(m) => BufDesc::Slice(m.as_slice()),
            None => BufDesc::Slice(buf.as_slice()),
        };
        fetched = q.submit_io_commit_cmd(tag, desc, res).await?;
        drop(mapped);
    }
}

/// The mapped bytes of a planned file read, when it is whole and in the page cache.
fn mapped_read(windows: &QueueWindows, file: BorrowedFd<'_>, offset: u64, len: usize, want: usize) -> Option<Mapped> {
    if len != want {
        return None;
    }
    let windows = windows
        .get_or_init(|| {
            // The data file is the image's for as long as the image is open, which outlives
            // the queue: its descriptor and size hold for every later plan.
            let size = std::fs::File::from(file.try_clone_to_owned().ok()?).metadata().ok()?.len();
            Some(Windows::new(file.as_raw_fd(), size))
        })
        .as_ref()?;
    if windows.fd() != file.as_raw_fd() {
        return None;
    }
    windows.get(offset, len, len < MAPPED_MIN)
}

/// Runs `work` (the request of `len` bytes at `offset`) on the engine's runtime and waits for it
/// here, woken by the doorbell; a failure is logged as `what` and becomes a negative errno.
async fn on_runtime<T: Send + 'static>(
    ctx: &QueueContext,
    bell: &Arc<Doorbell>,
    (what, offset, len): (&'static str, u64, usize),
    work: impl std::future::Future<Output = lazy_image_engine::Result<T>> + Send + 'static,
) -> Result<T, i32> {
    let (tx, rx) = futures::channel::oneshot::channel();
    let bell = bell.clone();
    ctx.rt.spawn(async move {
        let _ = tx.send(work.await);
        bell.ring();
    });
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::warn!(offset, len, error = %e.report(), "{what}");
            Err(ublk_errno(&e))
        }
        Err(_) => Err(-libc::EIO),
    }
}

/// A write (only a writable layer's view takes one): on this thread when it needs no wait,
/// else on the runtime with a copy of the request's bytes.
async fn write(ctx: &QueueContext, bell: &Arc<Doorbell>, offset: u64, src: Option<&[u8]>) -> i32 {
    let Some(src) = src else { return -libc::EINVAL };
    let res = match ctx.image.write_now(offset, src) {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => {
            tracing::warn!(offset, len = src.len(), error = %e.report(), "ublk write failed");
            Err(ublk_errno(&e))
        }
        None => {
            let (image, data) = (ctx.image.clone(), src.to_vec());
            on_runtime(ctx, bell, ("ublk write failed", offset, src.len()), async move { image.write(offset, &data).await }).await
        }
    };
    res.map_or_else(|e| e, |()| src.len() as i32)
}

/// A write on a device made with UBLK_F_NEED_GET_DATA: its bytes come only when asked for, to
/// an address of our choosing. A rewrite of blocks the view already holds goes straight into its
/// store (`write_place`), copied there by the driver: no copy into the tag's buffer and no
/// write(2). Any other write is taken into `buf` and written as usual. Returns bytes done (the
/// driver may hand over fewer than asked; it sends the rest again) or a negative errno.
async fn get_data_and_write(
    q: &UblkQueue<'_>,
    tag: u16,
    buf: &mut [u8],
    ctx: &QueueContext,
    bell: &Arc<Doorbell>,
    offset: u64,
    len: usize,
) -> i32 {
    if len > buf.len() {
        return -libc::EINVAL;
    }
    let mut place = ctx.image.write_place(offset, len);
    loop {
        let addr = place.map_or(buf.as_mut_ptr(), |p| p.as_ptr());
        // The unified calls only fetch and commit; this is the one other command we send.
        #[allow(deprecated)]
        let res = q.submit_io_cmd(tag, libublk::sys::UBLK_U_IO_NEED_GET_DATA, addr, 0).await;
        match res {
            r if r == libublk::sys::UBLK_IO_RES_OK as i32 => break,
            // The driver could copy nothing to `place` (it could not fault a page of it in) and
            // asks again: take the bytes into the tag's buffer instead.
            r if r == libublk::sys::UBLK_IO_RES_NEED_GET_DATA as i32 && place.is_some() => place = None,
            r if r == libublk::sys::UBLK_IO_RES_NEED_GET_DATA as i32 => continue,
            r => return if r < 0 { r } else { -libc::EIO },
        }
    }
    let got = ((q.get_iod(tag).nr_sectors as usize) << 9).min(len);
    match place {
        Some(_) => match ctx.image.placed(offset, got) {
            Ok(()) => got as i32,
            Err(e) => {
                tracing::warn!(offset, len = got, error = %e.report(), "ublk write failed");
                ublk_errno(&e)
            }
        },
        None => write(ctx, bell, offset, buf.get(..got)).await,
    }
}

/// Serves one request (`fetched`: the result its fetch completed with) into `buf`, or from a
/// mapped window (returned, for the commit); returns bytes done or a negative errno.
async fn handle_io(
    q: &UblkQueue<'_>,
    tag: u16,
    fetched: i32,
    buf: &mut [u8],
    ctx: &QueueContext,
    bell: &Arc<Doorbell>,
    windows: &QueueWindows,
) -> (i32, Option<Mapped>) {
    let iod = q.get_iod(tag);
    let op = iod.op_flags & 0xff;
    let offset = iod.start_sector << 9;
    let len = (iod.nr_sectors as usize) << 9;
    match op {
        libublk::sys::UBLK_IO_OP_READ => {}
        libublk::sys::UBLK_IO_OP_WRITE if fetched == libublk::sys::UBLK_IO_RES_NEED_GET_DATA as i32 => {
            return (get_data_and_write(q, tag, buf, ctx, bell, offset, len).await, None)
        }
        libublk::sys::UBLK_IO_OP_WRITE => return (write(ctx, bell, offset, buf.get(..len)).await, None),
        libublk::sys::UBLK_IO_OP_FLUSH | libublk::sys::UBLK_IO_OP_DISCARD | libublk::sys::UBLK_IO_OP_WRITE_ZEROES => {
            let image = ctx.image.clone();
            let r = on_runtime(ctx, bell, ("ublk request failed", offset, len), async move {
                match op {
                    libublk::sys::UBLK_IO_OP_FLUSH => image.flush().await,
                    _ => image.write_zeroes(offset, len as u64).await,
                }
            })
            .await;
            return (r.map_or_else(|e| e, |()| 0), None);
        }
        _ => return (-libc::EOPNOTSUPP, None),
    }
    let Some(dst) = buf.get_mut(..len) else {
        return (-libc::EINVAL, None);
    };
    let n = match ctx.image.plan_read(offset, dst) {
        ReadPlan::Copied(n) => n,
        ReadPlan::File { file, offset, len: flen, .. } => {
            if let Some(m) = mapped_read(windows, file, offset, flen, len) {
                return (len as i32, Some(m));
            }
            match read_cache(file.as_raw_fd(), offset, &mut dst[..flen]).await {
                Ok(()) => flen,
                Err(errno) => return (errno, None),
            }
        }
        ReadPlan::Miss => {
            let image = ctx.image.clone();
            match on_runtime(ctx, bell, ("ublk read failed", offset, len), async move { image.read(offset, len as u64).await }).await {
                Ok(bytes) => {
                    dst[..bytes.len()].copy_from_slice(&bytes);
                    bytes.len()
                }
                Err(errno) => return (errno, None),
            }
        }
    };
    // The device is rounded up to whole sectors: bytes past the image's end read as zeros.
    dst[n..].fill(0);
    (len as i32, None)
}
