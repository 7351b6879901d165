//! Keeps the FUSE sessions of FUSE+loop volumes alive while no plugin serves them. The kernel
//! ends a FUSE connection when the last descriptor of its `/dev/fuse` file closes, and every
//! reader then gets EIO for good; so the plugin passes a copy of each session's descriptor to
//! this small process (`lazy-image-fd-holder`), which only keeps them. While the plugin is
//! down, the kernel holds the readers' requests; the next plugin takes the descriptors back and
//! asks the kernel to send again what the dead one had read but not answered.
//!
//! The protocol: one request per connection on a `SOCK_SEQPACKET` Unix socket, JSON, a
//! descriptor passed with `SCM_RIGHTS` (`put` sends one, `get` receives a copy; the holder
//! keeps its own until `forget`, or until the kernel ends the connection, which it sees as an
//! error on the descriptor).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Largest message: a key, and a record of a few fields.
const MAX_MSG: usize = 64 << 10;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Request {
    Put { key: String, meta: String },
    Get { key: String },
    Forget { key: String },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Reply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    meta: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("socket path {} is too long", path.display())));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the result is checked and then owned.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn connect(path: &Path) -> io::Result<OwnedFd> {
    let s = seqpacket()?;
    let (addr, len) = sockaddr(path)?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    if unsafe { libc::connect(s.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // A holder that stops answering must not hang the plugin.
    let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: a valid timeval of the right size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
    }
    Ok(s)
}

/// Sends one message, with `fd` attached if given.
fn send(sock: BorrowedFd, msg: &[u8], fd: Option<BorrowedFd>) -> io::Result<()> {
    let mut iov = libc::iovec { iov_base: msg.as_ptr() as *mut _, iov_len: msg.len() };
    // Room for one descriptor, aligned for cmsghdr.
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; all zeroes is valid.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic; `cbuf` holds CMSG_SPACE(4) bytes
        // (32 bytes >= 24), and CMSG_FIRSTHDR of a msghdr whose control buffer is that big is
        // a valid pointer into it.
        unsafe {
            let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
            mh.msg_control = cbuf.as_mut_ptr().cast();
            mh.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    // SAFETY: `mh` points at live buffers for the duration of the call.
    if unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message and the descriptor attached to it, if any. An empty message is the
/// peer's end.
fn recv(sock: BorrowedFd) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MSG];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; all zeroes is valid.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr().cast();
    mh.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: `mh` points at live buffers; CLOEXEC for descriptors that arrive.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fd = None;
    // SAFETY: walking the control messages the kernel wrote into `cbuf`, as `mh` describes.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    if mh.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "message truncated"));
    }
    buf.truncate(n as usize);
    Ok((buf, fd))
}

/// The plugin's side: one short connection per request. With `spawn`, a holder that does not
/// answer is started (that binary, detached into its own session so that signals to the
/// plugin do not reach it).
pub struct HolderClient {
    socket: PathBuf,
    spawn: Option<PathBuf>,
}

impl HolderClient {
    pub fn new(socket: PathBuf, spawn: Option<PathBuf>) -> Self {
        HolderClient { socket, spawn }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn call(&self, req: &Request, fd: Option<BorrowedFd>) -> io::Result<(Reply, Option<OwnedFd>)> {
        let sock = match connect(&self.socket) {
            Ok(s) => s,
            Err(e) if self.spawn.is_some() && matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ECONNREFUSED)) => {
                self.start_holder()?
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("connecting to the fd holder at {}: {e}", self.socket.display()))),
        };
        let msg = serde_json::to_vec(req).map_err(io::Error::other)?;
        send(sock.as_fd(), &msg, fd)?;
        let (body, got) = recv(sock.as_fd())?;
        let reply: Reply =
            serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("fd holder reply: {e}")))?;
        if !reply.ok {
            return Err(io::Error::other(format!("fd holder: {}", reply.error.unwrap_or_default())));
        }
        Ok((reply, got))
    }

    fn start_holder(&self) -> io::Result<OwnedFd> {
        use std::os::unix::process::CommandExt;
        let Some(exe) = &self.spawn else { return Err(io::ErrorKind::NotFound.into()) };
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("--socket").arg(&self.socket).arg("--exit-when-idle");
        cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let mut child = cmd.spawn().map_err(|e| io::Error::new(e.kind(), format!("starting {}: {e}", exe.display())))?;
        tracing::info!(pid = child.id(), socket = %self.socket.display(), "started the fd holder");
        // Reaped by a thread of its own: it outlives us unless it exits early.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match connect(&self.socket) {
                Ok(s) => {
                    std::thread::spawn(move || child.wait());
                    return Ok(s);
                }
                Err(e) if Instant::now() > deadline => return Err(io::Error::new(e.kind(), format!("the fd holder did not answer: {e}"))),
                Err(_) => {}
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(io::Error::other(format!("the fd holder exited at start ({st})")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Hands the holder a copy of `fd` under `key`, with `meta` (replacing what it had there).
    pub fn put(&self, key: &str, meta: &str, fd: BorrowedFd) -> io::Result<()> {
        self.call(&Request::Put { key: key.into(), meta: meta.into() }, Some(fd)).map(|_| ())
    }

    /// A copy of the descriptor held under `key` and its `meta`; `None` if none is held.
    pub fn get(&self, key: &str) -> io::Result<Option<(String, OwnedFd)>> {
        match self.call(&Request::Get { key: key.into() }, None) {
            Ok((reply, Some(fd))) => Ok(Some((reply.meta.unwrap_or_default(), fd))),
            Ok((_, None)) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Lets the holder close what it keeps under `key`.
    pub fn forget(&self, key: &str) -> io::Result<()> {
        self.call(&Request::Forget { key: key.into() }, None).map(|_| ())
    }
}

struct Held {
    meta: String,
    fd: OwnedFd,
}

/// The holder's loop: answers requests one at a time and drops descriptors whose connection
/// the kernel ended. With `exit_when_idle`, returns once it has held nothing for that long.
pub fn serve(socket: &Path, exit_when_idle: Option<Duration>) -> io::Result<()> {
    let listener = bind(socket)?;
    tracing::info!(socket = %socket.display(), "fd holder listening");
    let mut held: BTreeMap<String, Held> = BTreeMap::new();
    let mut idle_since = Instant::now();
    loop {
        let mut fds = vec![libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        // No events asked of a held descriptor: poll still reports its error once the kernel
        // ends the connection (and reading it would steal the kernel's requests).
        let keys: Vec<String> = held.keys().cloned().collect();
        fds.extend(held.values().map(|h| libc::pollfd { fd: h.fd.as_raw_fd(), events: 0, revents: 0 }));
        // SAFETY: `fds` is a valid array of pollfd for its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for (k, p) in keys.iter().zip(&fds[1..]) {
            if p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                tracing::info!(key = %k, "FUSE connection ended; letting go of it");
                held.remove(k);
            }
        }
        if fds[0].revents & libc::POLLIN != 0 {
            // SAFETY: accept on our listening socket; the result is checked and then owned.
            let c = unsafe { libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
            if c >= 0 {
                // SAFETY: a fresh descriptor we own.
                let conn = unsafe { OwnedFd::from_raw_fd(c) };
                if let Err(e) = answer(&conn, &mut held) {
                    tracing::warn!(error = %e, "fd holder request failed");
                }
            }
        }
        if !held.is_empty() {
            idle_since = Instant::now();
        }
        if let Some(idle) = exit_when_idle {
            if held.is_empty() && idle_since.elapsed() >= idle {
                tracing::info!("fd holder holds nothing; exiting");
                let _ = std::fs::remove_file(socket);
                return Ok(());
            }
        }
    }
}

fn answer(conn: &OwnedFd, held: &mut BTreeMap<String, Held>) -> io::Result<()> {
    let (body, fd) = recv(conn.as_fd())?;
    let reply = |r: Reply, fd: Option<BorrowedFd>| send(conn.as_fd(), &serde_json::to_vec(&r).map_err(io::Error::other)?, fd);
    let req: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return reply(Reply { error: Some(format!("bad request: {e}")), ..Reply::default() }, None),
    };
    match req {
        Request::Put { key, meta } => match fd {
            Some(fd) => {
                tracing::info!(%key, "holding a FUSE session");
                held.insert(key, Held { meta, fd });
                reply(Reply { ok: true, ..Reply::default() }, None)
            }
            None => reply(Reply { error: Some("put without a descriptor".into()), ..Reply::default() }, None),
        },
        Request::Get { key } => match held.get(&key) {
            Some(h) => reply(Reply { ok: true, meta: Some(h.meta.clone()), ..Reply::default() }, Some(h.fd.as_fd())),
            None => reply(Reply { ok: true, ..Reply::default() }, None),
        },
        Request::Forget { key } => {
            if held.remove(&key).is_some() {
                tracing::info!(%key, "let go of a FUSE session");
            }
            reply(Reply { ok: true, ..Reply::default() }, None)
        }
    }
}

/// Binds `socket`, replacing a stale one; fails if a live holder answers there.
fn bind(socket: &Path) -> io::Result<OwnedFd> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if connect(socket).is_ok() {
        return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("an fd holder already answers at {}", socket.display())));
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let s = seqpacket()?;
    let (addr, len) = sockaddr(socket)?;
    // Only root (the plugin) may hand over or take descriptors.
    let old = {
        // SAFETY: umask has no preconditions.
        unsafe { libc::umask(0o077) }
    };
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    let rc = unsafe { libc::bind(s.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) };
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on our bound socket.
    if unsafe { libc::listen(s.as_raw_fd(), 16) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A descriptor put under a key comes back (the same open file: a pipe written through the
    /// copy reads on the original), stays held after a get, and is gone after forget.
    #[test]
    fn holds_and_returns_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("h.sock");
        let s2 = sock.clone();
        let server = std::thread::spawn(move || serve(&s2, Some(Duration::from_millis(300))));
        let c = HolderClient::new(sock.clone(), None);
        let t = Instant::now();
        while connect(&sock).is_err() {
            assert!(t.elapsed() < Duration::from_secs(10), "holder did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut p = [0i32; 2];
        // SAFETY: a two-int array for pipe's output.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors we own.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        c.put("vol-1", "{\"dev\":1}", w.as_fd()).unwrap();
        drop(w);
        for _ in 0..2 {
            let (meta, w2) = c.get("vol-1").unwrap().expect("held");
            assert_eq!(meta, "{\"dev\":1}");
            // SAFETY: writing one byte from a live buffer.
            assert_eq!(unsafe { libc::write(w2.as_raw_fd(), b"x".as_ptr().cast(), 1) }, 1);
        }
        let mut b = [0u8; 2];
        // SAFETY: reading into a live buffer.
        assert_eq!(unsafe { libc::read(r.as_raw_fd(), b.as_mut_ptr().cast(), 2) }, 2);
        assert!(c.get("other").unwrap().is_none());
        c.forget("vol-1").unwrap();
        assert!(c.get("vol-1").unwrap().is_none());
        // The holder let go of its copy: the pipe's writers are all closed.
        // SAFETY: reading into a live buffer.
        assert_eq!(unsafe { libc::read(r.as_raw_fd(), b.as_mut_ptr().cast(), 1) }, 0, "EOF once nothing holds the writer");
        // Holding nothing, it exits by itself.
        server.join().unwrap().unwrap();
        assert!(!sock.exists());
    }
}
