//! FUSE over io_uring: one queue per possible CPU (the kernel sends each request to the queue of
//! the CPU it was issued on, and wants every queue registered before it uses any). Each queue
//! thread is pinned to its CPU and owns a ring of `DEPTH` entries; an entry is a header buffer
//! and a payload buffer the kernel fills with a request. The answer is written into the same
//! buffers and handed back with COMMIT_AND_FETCH, which also asks for the next request.
//!
//! Only the queue thread submits to its ring: the kernel completes a ring command through the
//! task that submitted it, and a command submitted from a runtime thread dies with that thread.
//! Answers made elsewhere (misses, on the runtime) fill their entry's buffers, queue the commit
//! and wake the queue thread through an eventfd.

use super::abi::{self, InHeader};
use super::{Deliver, ImageFs, Reply, MAX_WRITE, SPIN_ENV};
use crate::lock;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use lazy_image_engine::cache::{advise_huge, direct_layout, DIRECT_ALIGN, HUGE_PAGE};
use lazy_image_engine::ReadPlan;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

/// Requests in flight per queue (the kernel holds the rest until an entry is free). Each entry
/// has a `MAX_WRITE` payload buffer.
const DEPTH: usize = 8;
/// `user_data` of the eventfd read that wakes a queue thread.
const WAKE: u64 = u64::MAX;
/// `user_data` bit of a cache file read for the entry in the low bits.
const CACHE_READ: u64 = 1 << 32;
/// `user_data` bit of a commit linked behind a cache read (see `read_cache`).
const LINKED: u64 = 1 << 33;

/// Cache reads up to this size go around the page cache when aligned for it (see `read_cache`).
const DIRECT_READ_MAX: usize = 64 << 10;

/// A warm random read's cache file read and its reader's next read come within this: a thread
/// still on its CPU is kicked into its task work, where a sleeping one costs a wakeup of an idle
/// CPU (on a VM, an exit to the host); longer polls hold the CPU the reader wants
/// (bench/README.md).
const SPIN_DEFAULT_US: u64 = 50;

/// A READ answered from the cache file through the ring, between its reads.
#[derive(Clone, Copy)]
struct CacheRead {
    unique: u64,
    commit_id: u64,
    offset: u64,
    want: usize,
    done: usize,
    /// The cache file, and its `O_DIRECT` descriptor if the plan offered one (as the engine's
    /// plan gave them; the image outlives the queue).
    fd: std::os::fd::RawFd,
    direct_fd: Option<std::os::fd::RawFd>,
    /// The read in flight goes through `direct_fd`.
    direct: bool,
}

/// A buffer the kernel and this process both write, reached only through its raw pointer
/// (never through a Rust reference), freed on drop.
struct RawBuf {
    ptr: *mut u8,
    len: usize,
    /// Mapped by `mapped` (unmapped on drop), else from the allocator.
    mapped: bool,
}

impl RawBuf {
    /// `len` bytes of zeros from the allocator, for the small buffers (an entry's header, the
    /// wakeup's read); payloads come from `mapped`.
    fn zeroed(len: usize) -> Self {
        let layout = direct_layout(len);
        // SAFETY: the layout has a non-zero size; a null result is handled.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        RawBuf { ptr, len, mapped: false }
    }

    /// `len` bytes of zeros mapped fresh, starting on a huge page and backed by huge pages
    /// where the system allows (see `advise_huge`). Pages come in only when first touched: the
    /// queue of a CPU no reader runs on costs no memory.
    fn mapped(len: usize) -> std::io::Result<Self> {
        // Mapped with a huge page to spare, then trimmed to a huge page boundary.
        let span = len + HUGE_PAGE;
        // SAFETY: a new private anonymous mapping; nothing else refers to that range.
        let map = unsafe {
            libc::mmap(std::ptr::null_mut(), span, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let (at, start) = (map as usize, (map as usize).next_multiple_of(HUGE_PAGE));
        // SAFETY: both pieces lie within the mapping made above and outside [start, start + len).
        unsafe {
            if start > at {
                libc::munmap(map, start - at);
            }
            if at + span > start + len {
                libc::munmap((start + len) as *mut libc::c_void, at + span - (start + len));
            }
        }
        let ptr = start as *mut u8;
        advise_huge(ptr, len);
        Ok(RawBuf { ptr, len, mapped: true })
    }
}

impl Drop for RawBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: the range `mapped` kept, unmapped once.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        } else {
            // SAFETY: `ptr` came from `alloc_zeroed` with this layout, freed once.
            unsafe { std::alloc::dealloc(self.ptr, direct_layout(self.len)) }
        }
    }
}

/// One entry's buffers: its header, and its payload in the queue's `payloads`. Owned by the
/// kernel from REGISTER or COMMIT_AND_FETCH until the completion that delivers a request, then
/// by exactly one `RingReply` (or the queue thread's cache read) until its commit.
struct Entry {
    header: RawBuf,
    iov: [libc::iovec; 2],
}

struct Queue {
    qid: u16,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    dev: Arc<File>,
    entries: Vec<Entry>,
    /// Every entry's payload, `MAX_WRITE` bytes each, in one mapping on huge pages where the
    /// system allows: the kernel looks up each page of an answer to copy it out, and huge pages
    /// make those lookups few.
    payloads: RawBuf,
    /// Commits (entry, commit id) made off the queue thread, for it to submit.
    pending: Mutex<Vec<(usize, u64)>>,
    /// Written to wake the queue thread (pending commits, or stop).
    wake: OwnedFd,
    /// Where the queue thread's read of `wake` lands.
    wake_buf: RawBuf,
    thread: OnceLock<std::thread::ThreadId>,
}

// SAFETY: entries' buffers are reached through raw pointers only, by one party at a time (see
// `Entry`); the ring is used by the queue thread only.
unsafe impl Send for Queue {}
// SAFETY: as for Send: the shared parts are used as said there.
unsafe impl Sync for Queue {}

impl Queue {
    fn new(qid: u16, dev: Arc<File>) -> std::io::Result<Self> {
        // Room for every entry's linked read and commit, and the wakeup's read.
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(DEPTH as u32 * 4)?;
        let payloads = RawBuf::mapped(DEPTH * MAX_WRITE)?;
        let entries = (0..DEPTH)
            .map(|i| {
                let header = RawBuf::zeroed(abi::RING_HEADER);
                let iov = [
                    libc::iovec { iov_base: header.ptr.cast(), iov_len: header.len },
                    libc::iovec { iov_base: payload_of(&payloads, i).cast(), iov_len: MAX_WRITE },
                ];
                Entry { header, iov }
            })
            .collect();
        // SAFETY: eventfd has no memory-safety preconditions; the fd is checked, then owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new eventfd, owned by nothing else.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Queue {
            qid,
            ring,
            dev,
            entries,
            payloads,
            pending: Mutex::new(Vec::new()),
            wake,
            wake_buf: RawBuf::zeroed(8),
            thread: OnceLock::new(),
        })
    }

    /// A FUSE ring command for entry `i`.
    fn command(&self, op: u32, commit_id: u64, i: usize) -> squeue::Entry128 {
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_le_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_le_bytes());
        let e = opcode::UringCmd80::new(types::Fd(self.dev.as_raw_fd()), op)
            .cmd(cmd)
            .addr(Some(self.entries[i].iov.as_ptr() as u64))
            .build()
            .user_data(i as u64);
        // The kernel wants the iovec count in the SQE's `len`, which the builder does not set.
        // SAFETY: Entry128 is the 128-byte `io_uring_sqe`; `len` is the u32 at byte 24.
        let mut raw: [u8; 128] = unsafe { std::mem::transmute(e) };
        raw[24..28].copy_from_slice(&2u32.to_le_bytes());
        // SAFETY: the same 128 bytes back as an Entry128, with `len` set.
        unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
    }

    /// Queues `e` for the next submit. Queue thread only.
    fn push(&self, e: &squeue::Entry128) -> std::io::Result<()> {
        self.push_all(std::slice::from_ref(e))
    }

    /// Queues all of `es` or none (a link must not lose its tail). Queue thread only.
    fn push_all(&self, es: &[squeue::Entry128]) -> std::io::Result<()> {
        // SAFETY: only the queue thread touches the submission queue; the buffers an entry
        // points to live as long as the queue.
        let mut sq = unsafe { self.ring.submission_shared() };
        // SAFETY: every entry's buffers live as long as the queue (see above).
        unsafe { sq.push_multiple(es) }.map_err(|_| std::io::Error::other("FUSE ring submission queue full"))?;
        sq.sync();
        Ok(())
    }

    /// Asks for the next wakeup through `wake`. Queue thread only.
    fn arm_wake(&self) -> std::io::Result<()> {
        let e = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), self.wake_buf.ptr, 8).build().user_data(WAKE);
        self.push(&squeue::Entry128::from(e))
    }

    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte buffer, as eventfd wants; the fd is open while the queue lives.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    /// Submits the commits of answers made since the last call. Queue thread only.
    fn push_pending(&self) {
        let pending = std::mem::take(&mut *lock(&self.pending));
        for (i, commit_id) in pending {
            if let Err(e) = self.push(&self.command(abi::URING_CMD_COMMIT_AND_FETCH, commit_id, i)) {
                tracing::warn!(error = %e, qid = self.qid, "FUSE ring commit not queued");
            }
        }
    }

    /// Writes the answer's header for entry `i`, whose payload holds `n` bytes of it.
    fn answer(&self, i: usize, unique: u64, error: i32, n: usize) {
        let head = abi::out_header(unique, error, n);
        // SAFETY: the caller owns entry `i` until its commit; offsets are < RING_HEADER.
        unsafe {
            let h = self.header(i);
            std::ptr::copy_nonoverlapping(head.as_ptr(), h, head.len());
            std::ptr::copy_nonoverlapping((n as u32).to_le_bytes().as_ptr(), h.add(abi::RING_PAYLOAD_SZ), 4);
        }
    }

    /// Answers entry `i` with `n` payload bytes (or `error`) and commits it. Queue thread only.
    fn commit(&self, i: usize, unique: u64, commit_id: u64, error: i32, n: usize) {
        self.answer(i, unique, error, if error == 0 { n } else { 0 });
        if let Err(e) = self.push(&self.command(abi::URING_CMD_COMMIT_AND_FETCH, commit_id, i)) {
            tracing::warn!(error = %e, qid = self.qid, "FUSE ring commit not queued");
        }
    }

    /// Reads `[offset + done, offset + want)` of the cache file into entry `i`'s payload
    /// through the ring, with the entry's commit linked behind it. Queue thread only.
    ///
    /// The answer's header is written first, for a read that fills the payload: the kernel then
    /// commits as soon as the read ends, in this thread's own task work, without waking it back
    /// to user space to submit the commit. A read that ends short or
    /// fails posts its completion (success posts none) and cancels the commit; the thread then
    /// reads on or answers an error.
    ///
    /// Small aligned reads skip the page cache when the plan offers a direct descriptor (see
    /// `ReadPlan::File`): the filesystem above the device caches what it reads, and a second
    /// copy of each 4 KiB block in the cache file's page cache cost a page insertion per read.
    /// Large reads stay buffered for the kernel's readahead.
    fn read_cache(&self, i: usize, r: &mut CacheRead) -> std::io::Result<()> {
        let (at, len) = (r.offset + r.done as u64, r.want - r.done);
        // The payload is page-aligned, so `done` aligned means the destination is too.
        let aligned = (at | len as u64 | r.done as u64) & (DIRECT_ALIGN as u64 - 1) == 0;
        let direct = r.direct_fd.filter(|_| r.want <= DIRECT_READ_MAX && aligned);
        r.direct = direct.is_some();
        let fd = direct.unwrap_or(r.fd);
        // SAFETY: the range is within the entry's payload (`want <= MAX_WRITE`).
        let dst = unsafe { self.payload(i).add(r.done) };
        let read = opcode::Read::new(types::Fd(fd), dst, (r.want - r.done) as u32)
            .offset(r.offset + r.done as u64)
            .build()
            .user_data(CACHE_READ | i as u64)
            .flags(squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS);
        self.answer(i, r.unique, 0, r.want);
        let commit = self.command(abi::URING_CMD_COMMIT_AND_FETCH, r.commit_id, i).user_data(LINKED | i as u64);
        self.push_all(&[squeue::Entry128::from(read), commit])
    }

    fn header(&self, i: usize) -> *mut u8 {
        self.entries[i].header.ptr
    }

    fn payload(&self, i: usize) -> *mut u8 {
        payload_of(&self.payloads, i)
    }
}

/// Entry `i`'s payload within a queue's `payloads` mapping.
fn payload_of(payloads: &RawBuf, i: usize) -> *mut u8 {
    debug_assert!(i < DEPTH);
    // SAFETY: `payloads` holds DEPTH payloads of MAX_WRITE bytes.
    unsafe { payloads.ptr.add(i * MAX_WRITE) }
}

struct RingReply {
    queue: Arc<Queue>,
    entry: usize,
    unique: u64,
    commit_id: u64,
}

impl Deliver for RingReply {
    /// Every request over the ring must be committed, or its entry is lost.
    const HAND_BACK_UNANSWERED: bool = true;

    fn deliver(&self, error: i32, body: &[u8]) {
        let n = if error == 0 { body.len().min(MAX_WRITE) } else { 0 };
        // SAFETY: this reply owns the entry until its commit (see `Entry`); `n <= MAX_WRITE`.
        unsafe { std::ptr::copy_nonoverlapping(body.as_ptr(), self.queue.payload(self.entry), n) };
        self.commit_answer(error, n);
    }

    fn payload(&mut self, len: usize) -> Option<&mut [u8]> {
        // SAFETY: this reply owns the entry's buffers until its commit (see `Entry`), which only
        // `deliver*` (taking `&self`, so after this borrow ends) or its drop makes.
        Some(unsafe { std::slice::from_raw_parts_mut(self.queue.payload(self.entry), len.min(MAX_WRITE)) })
    }

    fn deliver_written(&self, n: usize) {
        self.commit_answer(0, n.min(MAX_WRITE));
    }
}

impl RingReply {
    /// Answers with the `n` bytes in the entry's payload (or `error`) and has it committed.
    fn commit_answer(&self, error: i32, n: usize) {
        self.queue.answer(self.entry, self.unique, error, n);
        lock(&self.queue.pending).push((self.entry, self.commit_id));
        // The queue thread submits after each batch; anyone else must wake it.
        if self.queue.thread.get() != Some(&std::thread::current().id()) {
            self.queue.wake();
        }
    }
}

pub(super) struct Rings {
    queues: Vec<Arc<Queue>>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Rings {
    /// Registers every queue's entries and starts the queue threads.
    pub(super) fn start(fs: Arc<ImageFs>, dev: Arc<File>) -> std::io::Result<Self> {
        let n = possible_cpus();
        let stop = Arc::new(AtomicBool::new(false));
        let spin = spin_time(std::env::var(SPIN_ENV).ok().as_deref());
        let mut rings = Rings { queues: Vec::new(), threads: Vec::new(), stop: stop.clone() };
        for qid in 0..n {
            let q = Arc::new(Queue::new(qid, dev.clone())?);
            let (q2, fs, stop) = (q.clone(), fs.clone(), stop.clone());
            let t = std::thread::Builder::new().name(format!("lazy-image-fuse-q{qid}")).spawn(move || run(q2, fs, stop, spin))?;
            rings.queues.push(q);
            rings.threads.push(t);
        }
        Ok(rings)
    }

    /// Wakes every queue thread and waits for it. Call after the connection ended (unmount).
    pub(super) fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for q in &self.queues {
            q.wake();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// How long queue threads poll, from `SPIN_ENV`'s value if set.
fn spin_time(setting: Option<&str>) -> std::time::Duration {
    let us = match setting {
        Some(v) => v.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(value = %v, "{SPIN_ENV} is not a whole number of microseconds; polling {SPIN_DEFAULT_US} us");
            SPIN_DEFAULT_US
        }),
        None => SPIN_DEFAULT_US,
    };
    std::time::Duration::from_micros(us)
}

/// The kernel makes one queue per possible CPU (`/sys/devices/system/cpu/possible`, "0-3").
fn possible_cpus() -> u16 {
    let parse = |s: &str| -> Option<u16> {
        let mut n = 0u16;
        for part in s.trim().split(',') {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            n += b.parse::<u16>().ok()? - a.parse::<u16>().ok()? + 1;
        }
        Some(n)
    };
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| parse(&s))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u16))
}

fn run(q: Arc<Queue>, fs: Arc<ImageFs>, stop: Arc<AtomicBool>, spin: std::time::Duration) {
    // Requests arrive on the queue of the CPU that issued them: answering there avoids a
    // cross-CPU wakeup, the point of this transport. Not fatal if refused (offline CPU).
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(q.qid as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    let _ = q.thread.set(std::thread::current().id());
    // Registered from this thread: the kernel completes each command through its submitter.
    let registered = (0..DEPTH).try_for_each(|i| q.push(&q.command(abi::URING_CMD_REGISTER, 0, i))).and_then(|()| q.arm_wake());
    if let Err(e) = registered {
        tracing::warn!(error = %e, qid = q.qid, "registering FUSE ring entries");
        return;
    }
    let mut live = DEPTH;
    // Each entry's last cache read, looked at again only if it posts a completion (it failed or
    // ended short; a whole read posts none), which can only be the last one queued.
    let mut reads: Vec<Option<CacheRead>> = vec![None; DEPTH];
    // Whether the last batch held small cache hits and no large reads: a warm random reader,
    // whose next read comes soon and waits on our wakeup. After large reads (a sequential
    // reader) the CPU is better left to the loop device's and the reader's threads, and a miss's
    // answer comes from the network, long after any spin. Nor is there a spin after answering
    // a miss: it held a CPU that the reader, the loop device's worker and the origin wanted,
    // and cost more than it caught (bench/README.md).
    let mut small_hits = false;
    loop {
        let mut caught = false;
        if small_hits && q.ring.submitter().submit().is_ok() {
            let until = std::time::Instant::now() + spin;
            while !caught && std::time::Instant::now() < until {
                // SAFETY: only this thread reads the completion queue.
                caught = !unsafe { q.ring.completion_shared() }.is_empty();
                std::hint::spin_loop();
            }
        }
        // Polling caught a completion with everything already submitted: no wait to enter.
        match if caught { Ok(0) } else { q.ring.submitter().submit_and_wait(1) } {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, qid = q.qid, "FUSE ring wait failed; queue ends");
                return;
            }
        }
        // SAFETY: only this thread reads the completion queue.
        let done: Vec<(u64, i32)> = unsafe { q.ring.completion_shared() }.map(|c| (c.user_data(), c.result())).collect();
        let (mut small, mut large) = (false, false);
        for (ud, res) in done {
            if ud == WAKE {
                if let Err(e) = q.arm_wake() {
                    tracing::warn!(error = %e, qid = q.qid, "re-arming the FUSE queue wakeup");
                }
                continue;
            }
            if ud & CACHE_READ != 0 {
                let i = (ud & !CACHE_READ) as usize;
                let Some(mut r) = reads[i].take() else { continue };
                if res > 0 {
                    r.done += res as usize;
                }
                if r.done == r.want {
                    // Whole after all: the linked commit went ahead.
                    continue;
                }
                if res == -libc::EINVAL && r.direct {
                    // The filesystem refused direct I/O after all: stop using it, read buffered.
                    fs.image.direct_refused();
                    r.direct_fd = None;
                }
                let error = match res {
                    n if n > 0 || (n == -libc::EINVAL && r.direct) => match q.read_cache(i, &mut r) {
                        Ok(()) => {
                            reads[i] = Some(r);
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cache read not queued");
                            -libc::EIO
                        }
                    },
                    0 => {
                        tracing::error!(offset = r.offset, "cache file ended early");
                        -libc::EIO
                    }
                    e => {
                        tracing::warn!(offset = r.offset, error = %std::io::Error::from_raw_os_error(-e), "cache read failed");
                        -libc::EIO
                    }
                };
                q.commit(i, r.unique, r.commit_id, error, r.want);
                continue;
            }
            if ud & LINKED != 0 && res == -libc::ECANCELED {
                // Cancelled behind a failed read (the kernel skips posting that where the read's
                // success would have been skipped), or the ring is ending, which `stop` sees to.
                continue;
            }
            let ud = ud & !LINKED;
            if res < 0 {
                // The connection ended (ENOTCONN, ECANCELED) or the kernel refused a commit.
                live -= 1;
                if !stop.load(Ordering::SeqCst) && res != -libc::ENOTCONN && res != -libc::ECANCELED {
                    tracing::warn!(qid = q.qid, error = %std::io::Error::from_raw_os_error(-res), "FUSE ring entry failed");
                }
                continue;
            }
            let i = ud as usize;
            // SAFETY: the kernel handed this entry back with a request; it is ours until the
            // reply commits it. Copies are taken before the reply may overwrite the buffers.
            let (h, commit_id, arg, in_payload) = unsafe {
                let header = std::slice::from_raw_parts(q.header(i), abi::RING_HEADER);
                let h = InHeader::parse(header);
                let commit_id = abi::u64_at(header, abi::RING_COMMIT_ID);
                let in_payload = (abi::u32_at(header, abi::RING_PAYLOAD_SZ) as usize).min(MAX_WRITE);
                // The op's header arrives in op_in; further arguments (a LOOKUP's name) in the
                // payload.
                let arg = match h {
                    Some(h) if h.opcode == abi::LOOKUP => std::slice::from_raw_parts(q.payload(i), in_payload).to_vec(),
                    _ => header[abi::RING_OP_IN..abi::RING_OP_IN + 128].to_vec(),
                };
                (h, commit_id, arg, in_payload)
            };
            // A write's bytes are in the entry's payload, which is ours until the reply commits.
            if let Some(h) = h.filter(|h| h.opcode == abi::WRITE && h.nodeid == super::FILE) {
                let (offset, size) = (abi::u64_at(&arg, 8), abi::u32_at(&arg, 16) as usize);
                // SAFETY: entry `i` is ours until its commit; `in_payload` <= MAX_WRITE. The write
                // copies what it keeps before the reply is sent.
                let data = unsafe { std::slice::from_raw_parts(q.payload(i), in_payload) };
                let reply = Reply::new(RingReply { queue: q.clone(), entry: i, unique: h.unique, commit_id });
                fs.write(offset, size, Some(data), reply);
                continue;
            }
            // A read whose chunks are all cached goes to the cache file through this ring: no
            // other thread involved, and several disk reads in flight for sequential readers.
            if let Some(h) = h.filter(|h| h.opcode == abi::READ && h.nodeid == super::FILE) {
                let (offset, size) = (abi::u64_at(&arg, 8), (abi::u32_at(&arg, 16) as usize).min(MAX_WRITE));
                large |= size > DIRECT_READ_MAX;
                // SAFETY: entry `i` is ours until its commit; `size` <= MAX_WRITE, its payload's size.
                let payload = unsafe { std::slice::from_raw_parts_mut(q.payload(i), size) };
                match fs.image.plan_read(offset, payload) {
                    ReadPlan::Copied(n) => {
                        small |= size <= DIRECT_READ_MAX;
                        q.commit(i, h.unique, commit_id, 0, n);
                    }
                    ReadPlan::File { file, direct, offset, len } => {
                        small |= size <= DIRECT_READ_MAX;
                        let (fd, direct_fd) = (file.as_raw_fd(), direct.map(|d| d.as_raw_fd()));
                        let mut r = CacheRead { unique: h.unique, commit_id, offset, want: len, done: 0, fd, direct_fd, direct: false };
                        if let Err(e) = q.read_cache(i, &mut r) {
                            tracing::warn!(error = %e, "cache read not queued");
                            q.commit(i, r.unique, r.commit_id, -libc::EIO, 0);
                        } else {
                            reads[i] = Some(r);
                        }
                    }
                    ReadPlan::Miss => {
                        let reply = Reply::new(RingReply { queue: q.clone(), entry: i, unique: h.unique, commit_id });
                        fs.read_on_runtime(offset, size, reply);
                    }
                }
                continue;
            }
            let reply = Reply::new(RingReply { queue: q.clone(), entry: i, unique: h.map_or(commit_id, |h| h.unique), commit_id });
            match h {
                Some(h) => fs.serve(&h, &arg, reply),
                None => reply.send(-libc::EINVAL, &[]),
            }
        }
        q.push_pending();
        small_hits = small && !large && !spin.is_zero();
        if stop.load(Ordering::SeqCst) || live == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Pages of `[ptr, ptr + len)` in memory.
    fn resident(ptr: *mut u8, len: usize) -> usize {
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: a mapped, page-aligned range; `vec` has a byte per page of it.
        assert_eq!(unsafe { libc::mincore(ptr.cast(), len, vec.as_mut_ptr()) }, 0);
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    /// The payload mapping starts on a huge page, holds zeros, and takes memory only where it
    /// is touched.
    #[test]
    fn payload_mapping_is_aligned_zeroed_and_lazy() {
        let len = DEPTH * MAX_WRITE;
        let b = RawBuf::mapped(len).unwrap();
        assert_eq!(b.ptr as usize % HUGE_PAGE, 0);
        assert_eq!(resident(b.ptr, len), 0, "nothing is in memory before it is touched");
        // SAFETY: within the mapping; nothing else uses it.
        let bytes = unsafe {
            *b.ptr.add(len - 1) = 7;
            std::slice::from_raw_parts(b.ptr, len)
        };
        assert!(bytes[..len - 1].iter().all(|&x| x == 0));
        assert_eq!(bytes[len - 1], 7);
    }

    #[test]
    fn spin_time_reads_the_setting_and_keeps_the_default_on_bad_input() {
        assert_eq!(spin_time(None), Duration::from_micros(SPIN_DEFAULT_US));
        assert_eq!(spin_time(Some("0")), Duration::ZERO);
        assert_eq!(spin_time(Some(" 120 ")), Duration::from_micros(120));
        assert_eq!(spin_time(Some("50us")), Duration::from_micros(SPIN_DEFAULT_US));
        assert_eq!(spin_time(Some("-1")), Duration::from_micros(SPIN_DEFAULT_US));
    }
}
