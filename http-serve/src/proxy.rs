//! A TCP proxy that delays every piece of data by a fixed time in each direction, so benchmarks on
//! loopback see a round trip like a real network's (this kernel has no netem). Data keeps flowing
//! while earlier pieces wait out their delay; an optional per-connection rate limit slows the
//! server-to-client direction (crash tests need a fill that takes seconds).
//!
//! Pieces wait in pipes, moved with `splice(2)`: the proxy passes page references from one socket
//! to the other and never copies the bytes. It shares the CPU with both ends, and netem's delay
//! would cost them next to nothing: copying through buffers took a third of a 2-core machine's
//! CPU during a cold sequential read at 5 ms each way, about 0.85 CPU-seconds per GiB.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// `rate`: bytes per second per connection from upstream to client; `None` is unlimited.
pub async fn run(listen: SocketAddr, upstream: SocketAddr, delay: Duration, rate: Option<u64>) -> io::Result<()> {
    serve(TcpListener::bind(listen).await?, upstream, delay, rate).await
}

/// `run` on a listener already bound.
pub async fn serve(listener: TcpListener, upstream: SocketAddr, delay: Duration, rate: Option<u64>) -> io::Result<()> {
    raise_fd_limit();
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else { return };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client, server) = (Arc::new(client), Arc::new(server));
            tokio::join!(pipe(client.clone(), server.clone(), delay, None), pipe(server, client, delay, rate));
        });
    }
}

/// Most bytes a piece takes (its pipe's size where the kernel allows it).
const PIECE: usize = 1 << 20;
/// Pieces waiting out their delay per direction: each holds a pipe (two descriptors).
const PIECES_IN_FLIGHT: usize = 256;

/// A pipe holding one piece of data on its way.
struct Piece {
    read: OwnedFd,
    write: OwnedFd,
}

impl Piece {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Larger pieces mean fewer pipes and calls; the default 64 KiB still works.
        // SAFETY: plain fcntl on a descriptor we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIECE as libc::c_int) };
        Ok(Piece { read, write })
    }
}

/// Moves up to `len` bytes from `from` to `to` without blocking.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both are open descriptors; null offsets mean "the current position" (pipes, sockets).
    let n =
        unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One direction of a connection: what `from` receives is sent on `to` `delay` later.
async fn pipe(from: Arc<TcpStream>, to: Arc<TcpStream>, delay: Duration, rate: Option<u64>) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Piece, usize)>(PIECES_IN_FLIGHT);
    // Emptied pipes go back to the reader for reuse; it makes at most PIECES_IN_FLIGHT.
    let (spare_tx, mut spare_rx) = mpsc::unbounded_channel::<Piece>();
    let reader = async move {
        let mut made = 0;
        loop {
            let fresh = match spare_rx.try_recv() {
                Ok(p) => Some(p),
                Err(_) if made < PIECES_IN_FLIGHT => Piece::new().ok().inspect(|_| made += 1),
                Err(_) => None,
            };
            // At the cap, or out of descriptors: wait for a piece in flight, or give up on the
            // connection if there is none to wait for.
            let piece = match fresh {
                Some(p) => p,
                None if made == 0 => break,
                None => match spare_rx.recv().await {
                    Some(p) => p,
                    None => break,
                },
            };
            let n = loop {
                if from.readable().await.is_err() {
                    break 0;
                }
                match from.try_io(Interest::READABLE, || splice(from.as_raw_fd(), piece.write.as_raw_fd(), PIECE)) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => break 0,
                }
            };
            if n == 0 {
                break;
            }
            if let Some(r) = rate.filter(|r| *r > 0) {
                tokio::time::sleep(Duration::from_secs_f64(n as f64 / r as f64)).await;
            }
            if tx.send((Instant::now() + delay, piece, n)).await.is_err() {
                break;
            }
        }
    };
    let writer = async move {
        'pieces: while let Some((at, piece, mut left)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            while left > 0 {
                if to.writable().await.is_err() {
                    break 'pieces;
                }
                match to.try_io(Interest::WRITABLE, || splice(piece.read.as_raw_fd(), to.as_raw_fd(), left)) {
                    Ok(0) => break 'pieces,
                    Ok(n) => left -= n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => break 'pieces,
                }
            }
            let _ = spare_tx.send(piece);
        }
        // The other end sees the end of this direction; the opposite one may still be open.
        // SAFETY: `to` is open: this closure holds a reference to it.
        unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
    };
    tokio::join!(reader, writer);
}

/// Each piece in flight holds two descriptors; a busy proxy needs more than a default 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain get/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
