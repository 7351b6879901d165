//! Plain-HTTP ranged GETs on connections of our own, whose bodies are read from the socket
//! straight into the run's buffer. Through reqwest each piece of a body lands in hyper's buffer
//! first and is copied from there into the run: at a GiB/s that copy was about a tenth of the
//! node daemon's CPU on a cold sequential read. Only the plain case is read here (http, no
//! proxy, a 206 framed by Content-Length); the caller sends the rest through reqwest.

use super::RangeSink;
use crate::error::{Error, ErrorKind, Result};
use crate::lock;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, RANGE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most bytes an answer's status line and headers may take.
const MAX_HEAD: usize = 64 << 10;
const MAX_HEADERS: usize = 64;
/// Idle connections older than this are not reused: servers close theirs after a few seconds
/// (Apache after 5), and a request sent just as the server closes fails.
const IDLE_REUSE: Duration = Duration::from_secs(4);

/// A body at least this long is read with the socket's receive low-water mark raised to
/// `BODY_LOWAT` (lowered to what is left near its end): the reading thread then wakes for a
/// quarter MiB at a time rather than for every few segments that arrive, with fewer `recv`
/// calls and fewer window updates sent back. A reader waiting on the run's first bytes waits
/// for that much more at most. Shorter bodies are read as they come.
const LOWAT_MIN_BODY: u64 = 1 << 20;
const BODY_LOWAT: u64 = 256 << 10;

/// Proxy variables reqwest follows for http URLs; with one set, requests go through reqwest.
const PROXY_VARS: [&str; 4] = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"];

pub(super) struct Http1 {
    host: String,
    port: u16,
    /// The request up to its Range line: request line, Host and the caller's headers.
    head: Vec<u8>,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
    max_idle: usize,
    connect_timeout: Duration,
}

/// How an answer was taken.
pub(super) enum Answer {
    /// Checked, and its whole body is in the sink.
    Read,
    /// Checked, but framed otherwise than by a Content-Length (chunked): not read, nothing in
    /// the sink. The connection was dropped.
    NotPlain,
}

impl Http1 {
    /// None unless `url` is plain http with no proxy configured in the environment.
    pub(super) fn new(url: &reqwest::Url, headers: &HeaderMap, max_idle: usize, connect_timeout: Duration) -> Option<Self> {
        if url.scheme() != "http" || PROXY_VARS.iter().any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty())) {
            return None;
        }
        let host = match url.host()? {
            url::Host::Domain(d) => d.to_owned(),
            url::Host::Ipv4(a) => a.to_string(),
            url::Host::Ipv6(a) => a.to_string(),
        };
        let port = url.port_or_known_default()?;
        let mut head = Vec::new();
        let mut target = url.path().to_owned();
        if let Some(q) = url.query() {
            target.push('?');
            target.push_str(q);
        }
        // `host_str` keeps an IPv6 address's brackets, as the Host header wants.
        let host_header = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str()?),
            None => url.host_str()?.to_owned(),
        };
        write!(head, "GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: lazy-image/{}\r\n", env!("CARGO_PKG_VERSION")).ok()?;
        for (name, value) in headers {
            // Framing and the range are ours to set.
            if [HOST, RANGE, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING].contains(name) {
                continue;
            }
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        Some(Http1 { host, port, head, idle: Mutex::new(Vec::new()), max_idle, connect_timeout })
    }

    /// GETs bytes `first..=last` into `sink`. `check` judges the answer's status and headers
    /// before any of its body is taken; `what` names the request in errors.
    pub(super) async fn fetch_to(
        &self,
        first: u64,
        last: u64,
        sink: &dyn RangeSink,
        check: impl FnOnce(StatusCode, &HeaderMap) -> Result<()>,
        what: &(dyn Fn() -> String + Sync),
    ) -> Result<Answer> {
        let transport = |doing: &str, e: io::Error| Error::with_source(ErrorKind::Transport, format!("{}: {doing}", what()), e);
        let protocol = |msg: String| Error::new(ErrorKind::Protocol, format!("{}: {msg}", what()));
        let mut conn = match self.take_idle() {
            Some(c) => c,
            None => self.connect().await.map_err(|e| transport("connecting", e))?,
        };
        let mut req = Vec::with_capacity(self.head.len() + 64);
        req.extend_from_slice(&self.head);
        req.extend_from_slice(format!("Range: bytes={first}-{last}\r\n\r\n").as_bytes());
        conn.write_all(&req).await.map_err(|e| transport("sending the request", e))?;

        // The head, and whatever of the body came in the same reads.
        let mut buf = Vec::with_capacity(8 << 10);
        let (status, headers, keep_alive, head_len) = loop {
            if buf.len() == buf.capacity() {
                if buf.len() >= MAX_HEAD {
                    return Err(protocol(format!("answer's head is longer than {MAX_HEAD} bytes")));
                }
                buf.reserve(buf.len());
            }
            if conn.read_buf(&mut buf).await.map_err(|e| transport("reading the answer", e))? == 0 {
                return Err(Error::new(ErrorKind::Transport, format!("{}: connection closed before a whole answer", what())));
            }
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut slots);
            match resp.parse(&buf) {
                Ok(httparse::Status::Partial) => continue,
                Ok(httparse::Status::Complete(n)) => {
                    let status = resp.code.and_then(|c| StatusCode::from_u16(c).ok()).ok_or_else(|| protocol("no status".into()))?;
                    let mut headers = HeaderMap::with_capacity(resp.headers.len());
                    for h in resp.headers.iter() {
                        let name =
                            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| protocol(format!("bad header name {:?}", h.name)))?;
                        let value = HeaderValue::from_bytes(h.value).map_err(|_| protocol(format!("bad value of header {name}")))?;
                        headers.append(name, value);
                    }
                    let close = headers.get_all(CONNECTION).iter().any(|v| has_token(v, "close"));
                    let keep = if resp.version == Some(1) {
                        !close
                    } else {
                        headers.get_all(CONNECTION).iter().any(|v| has_token(v, "keep-alive"))
                    };
                    break (status, headers, keep, n);
                }
                Err(e) => return Err(protocol(format!("malformed answer ({e})"))),
            }
        };
        check(status, &headers)?;
        if headers.contains_key(TRANSFER_ENCODING) {
            return Ok(Answer::NotPlain);
        }
        let Some(length) = headers.get(CONTENT_LENGTH) else { return Ok(Answer::NotPlain) };
        let len = last - first + 1;
        if length.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) != Some(len) {
            return Err(protocol(format!("Content-Length {length:?} for {len} bytes")));
        }

        let early = &buf[head_len..];
        if early.len() as u64 > len {
            return Err(protocol("body longer than asked".into()));
        }
        if !early.is_empty() && !sink.push(early) {
            return Err(protocol(format!("{len} bytes do not fit where they go")));
        }
        let mut got = early.len() as u64;
        let mut lowat = LowWater::new(&conn, len >= LOWAT_MIN_BODY);
        while got < len {
            lowat.set(BODY_LOWAT.min(len - got)).map_err(|e| transport("setting the receive low-water mark", e))?;
            conn.readable().await.map_err(|e| transport(&format!("reading body at {got} of {len} bytes"), e))?;
            // `len - got` fits: the sink holds the whole range in memory.
            let read = sink.push_from((len - got) as usize, &mut |room| conn.try_read_buf(&mut &mut *room).map(drop));
            match read {
                None => return Err(protocol(format!("{len} bytes do not fit where they go"))),
                Some(Ok(0)) => return Err(Error::new(ErrorKind::Transport, format!("{}: body cut at {got} of {len} bytes", what()))),
                Some(Ok(n)) => got += n as u64,
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Some(Err(e)) => return Err(transport(&format!("reading body at {got} of {len} bytes"), e)),
            }
        }
        // The next request's head is read as it comes; a socket left waiting for more is not
        // reused.
        if keep_alive && lowat.set(1).is_ok() {
            let mut idle = lock(&self.idle);
            idle.retain(|(_, since)| since.elapsed() < IDLE_REUSE);
            if idle.len() < self.max_idle {
                idle.push((conn, Instant::now()));
            }
        }
        Ok(Answer::Read)
    }

    /// An idle connection still worth a request: recent, and not closed by the server.
    fn take_idle(&self) -> Option<TcpStream> {
        let mut idle = lock(&self.idle);
        while let Some((conn, since)) = idle.pop() {
            // A server that closed the connection left an end of file (or stray bytes) to read.
            let open = matches!(conn.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
            if open && since.elapsed() < IDLE_REUSE {
                return Some(conn);
            }
        }
        None
    }

    async fn connect(&self) -> io::Result<TcpStream> {
        let conn = tokio::time::timeout(self.connect_timeout, TcpStream::connect((self.host.as_str(), self.port)))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no connection within {:?}", self.connect_timeout)))??;
        conn.set_nodelay(true)?;
        Ok(conn)
    }
}

/// A socket's `SO_RCVLOWAT`, set only when it changes (and left at 1 when not `enabled`). The
/// socket reads as ready only once that many bytes wait (or the window fills, or the peer
/// closes), so the mark must never exceed what is left to come: callers lower it before the
/// body's last bytes and reset it before the connection is reused.
struct LowWater<'a> {
    conn: &'a TcpStream,
    enabled: bool,
    current: u64,
}

impl<'a> LowWater<'a> {
    fn new(conn: &'a TcpStream, enabled: bool) -> Self {
        LowWater { conn, enabled, current: 1 }
    }

    /// Makes the mark at most `bytes`: exactly `bytes` when enabled, else it stays at 1.
    fn set(&mut self, bytes: u64) -> io::Result<()> {
        let bytes = bytes.max(1);
        if !self.enabled || bytes == self.current {
            return Ok(());
        }
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: the descriptor is the live socket `conn` borrows; the option value is a c_int
        // whose size is passed with it.
        let rc = unsafe {
            libc::setsockopt(
                self.conn.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.current = bytes;
        Ok(())
    }
}

/// True if the comma-separated header value lists `token` (case-insensitively).
fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::RangeBuf;
    use std::sync::Arc;
    use tokio::net::TcpListener;

    /// What the test server does for one request: write these pieces (pausing between them, so
    /// the client reads them apart), then close the connection or not.
    struct Script {
        pieces: Vec<Vec<u8>>,
        close: bool,
    }

    /// A server that answers requests in turn with `scripts`, recording for each the index of
    /// the connection it came on and its Range header.
    async fn server(scripts: Vec<Script>) -> (reqwest::Url, Arc<Mutex<Vec<(usize, String)>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = reqwest::Url::parse(&format!("http://{}/image.img", listener.local_addr().unwrap())).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let scripts = Arc::new(Mutex::new(scripts.into_iter().collect::<std::collections::VecDeque<_>>()));
        let log = seen.clone();
        tokio::spawn(async move {
            for conn_index in 0.. {
                let (mut conn, _) = listener.accept().await.unwrap();
                let (log, scripts) = (log.clone(), scripts.clone());
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    loop {
                        let mut byte = [0u8; 1];
                        if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        req.push(byte[0]);
                        if !req.ends_with(b"\r\n\r\n") {
                            continue;
                        }
                        let text = String::from_utf8_lossy(&req).to_string();
                        let range = text.lines().find_map(|l| l.strip_prefix("Range: ")).unwrap_or_default().to_owned();
                        lock(&log).push((conn_index, range));
                        req.clear();
                        let Some(script) = lock(&scripts).pop_front() else { return };
                        for piece in script.pieces {
                            conn.write_all(&piece).await.unwrap();
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        if script.close {
                            return;
                        }
                    }
                });
            }
        });
        (url, seen)
    }

    fn body(first: u64, len: usize) -> Vec<u8> {
        (first..first + len as u64).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// A 206 for `len` bytes at `first` of a 1000-byte image, with `extra` header lines.
    fn answer(first: u64, len: usize, extra: &str) -> Vec<u8> {
        let last = first + len as u64 - 1;
        let mut a = format!("HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {first}-{last}/1000\r\n{extra}\r\n").into_bytes();
        a.extend(body(first, len));
        a
    }

    fn whole(first: u64, len: usize, extra: &str, close: bool) -> Script {
        Script { pieces: vec![answer(first, len, &format!("Content-Length: {len}\r\n{extra}"))], close }
    }

    fn client(url: &reqwest::Url) -> Http1 {
        Http1::new(url, &HeaderMap::new(), 8, Duration::from_secs(5)).unwrap()
    }

    async fn get(h: &Http1, first: u64, len: usize) -> (Result<Answer>, RangeBuf) {
        let sink = RangeBuf::new(len);
        let check = |status: StatusCode, _: &HeaderMap| match status {
            StatusCode::PARTIAL_CONTENT => Ok(()),
            s => Err(Error::new(ErrorKind::OriginStatus(s.as_u16()), "test")),
        };
        let res = h.fetch_to(first, first + len as u64 - 1, &sink, check, &|| "test".to_owned()).await;
        (res, sink)
    }

    #[tokio::test]
    async fn answers_in_odd_pieces_are_read_whole_and_the_connection_is_reused() {
        // The head split mid-line, then its end with the body's first bytes, then the rest.
        let a = answer(100, 300, "Content-Length: 300\r\n");
        let head_end = a.len() - 300;
        let split = Script { pieces: vec![a[..10].to_vec(), a[10..head_end + 3].to_vec(), a[head_end + 3..].to_vec()], close: false };
        let (url, seen) = server(vec![split, whole(0, 1000, "", false)]).await;
        let h = client(&url);
        let (res, sink) = get(&h, 100, 300).await;
        assert!(matches!(res, Ok(Answer::Read)), "{:?}", res.err());
        assert_eq!(&sink.take()[..], &body(100, 300)[..]);
        let (res, sink) = get(&h, 0, 1000).await;
        assert!(matches!(res, Ok(Answer::Read)), "{:?}", res.err());
        assert_eq!(&sink.take()[..], &body(0, 1000)[..]);
        assert_eq!(*lock(&seen), [(0, "bytes=100-399".to_owned()), (0, "bytes=0-999".to_owned())]);
    }

    #[tokio::test]
    async fn closed_connections_are_not_reused() {
        let scripts = vec![
            // Says it closes.
            whole(0, 10, "Connection: close\r\n", true),
            // Says nothing, and closes while idle.
            whole(10, 10, "", true),
            whole(20, 10, "", false),
        ];
        let (url, seen) = server(scripts).await;
        let h = client(&url);
        for first in [0, 10, 20] {
            let (res, sink) = get(&h, first, 10).await;
            assert!(matches!(res, Ok(Answer::Read)), "{:?}", res.err());
            assert_eq!(&sink.take()[..], &body(first, 10)[..]);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let conns: Vec<usize> = lock(&seen).iter().map(|s| s.0).collect();
        assert_eq!(conns, [0, 1, 2], "each request on a new connection");
    }

    #[tokio::test]
    async fn chunked_answers_are_left_to_the_caller() {
        let chunked = Script { pieces: vec![answer(0, 10, "Transfer-Encoding: chunked\r\n")], close: false };
        let (url, _) = server(vec![chunked]).await;
        let (res, sink) = get(&client(&url), 0, 10).await;
        assert!(matches!(res, Ok(Answer::NotPlain)), "{:?}", res.err());
        assert_eq!(sink.received(), 0, "nothing taken from a body not read here");
    }

    #[tokio::test]
    async fn wrong_lengths_and_cut_bodies_are_errors() {
        let a = answer(0, 100, "Content-Length: 100\r\n");
        let scripts = vec![
            whole(0, 50, "", false),
            Script { pieces: vec![a[..a.len() - 60].to_vec()], close: true },
            Script { pieces: vec![b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n".to_vec()], close: false },
        ];
        let (url, _) = server(scripts).await;
        let h = client(&url);
        let (res, sink) = get(&h, 0, 100).await;
        let e = res.err().expect("a 50-byte answer to a 100-byte range");
        assert_eq!(e.kind(), ErrorKind::Protocol, "{}", e.report());
        assert_eq!(sink.received(), 0);
        let (res, sink) = get(&h, 0, 100).await;
        let e = res.err().expect("a body cut short");
        assert_eq!(e.kind(), ErrorKind::Transport, "{}", e.report());
        assert_eq!(&sink.take()[..], &body(0, 40)[..], "what came before the cut is kept");
        let (res, _) = get(&h, 0, 100).await;
        assert_eq!(res.err().map(|e| e.kind()), Some(ErrorKind::OriginStatus(503)), "the check judges the status");
    }

    /// A sink that counts the socket reads that brought bytes.
    struct CountingSink {
        inner: RangeBuf,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl RangeSink for CountingSink {
        fn received(&self) -> u64 {
            self.inner.received()
        }
        fn push(&self, bytes: &[u8]) -> bool {
            self.inner.push(bytes)
        }
        fn push_from(&self, max: usize, read: &mut dyn FnMut(&mut dyn bytes::BufMut) -> io::Result<()>) -> Option<io::Result<usize>> {
            let res = self.inner.push_from(max, read);
            if matches!(res, Some(Ok(n)) if n > 0) {
                self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            res
        }
    }

    #[tokio::test]
    async fn long_bodies_are_read_in_large_steps_and_the_next_head_as_it_comes() {
        // A 1.5 MiB body in 24 pieces 5 ms apart: read as they come, that is a read per piece.
        const PIECE: usize = 64 << 10;
        let len = 24 * PIECE;
        let a = answer(0, len, &format!("Content-Length: {len}\r\n"));
        let head_end = a.len() - len;
        let mut pieces = vec![a[..head_end].to_vec()];
        pieces.extend(a[head_end..].chunks(PIECE).map(<[u8]>::to_vec));
        let (url, seen) = server(vec![Script { pieces, close: false }, whole(0, 10, "", false)]).await;
        let h = client(&url);
        let sink = CountingSink { inner: RangeBuf::new(len), reads: Default::default() };
        let check = |status: StatusCode, _: &HeaderMap| {
            assert_eq!(status, StatusCode::PARTIAL_CONTENT);
            Ok(())
        };
        let res = h.fetch_to(0, len as u64 - 1, &sink, check, &|| "test".to_owned()).await;
        assert!(matches!(res, Ok(Answer::Read)), "{:?}", res.err());
        assert_eq!(&sink.inner.take()[..], &body(0, len)[..]);
        let reads = sink.reads.load(std::sync::atomic::Ordering::Relaxed);
        assert!(reads <= 12, "{reads} reads for 24 pieces: the low-water mark was not raised");
        // The same connection's next answer is short; a mark left raised would leave it unread.
        let (res, sink) = tokio::time::timeout(Duration::from_secs(5), get(&h, 0, 10)).await.expect("the next answer is read");
        assert!(matches!(res, Ok(Answer::Read)), "{:?}", res.err());
        assert_eq!(&sink.take()[..], &body(0, 10)[..]);
        assert_eq!(lock(&seen).iter().map(|s| s.0).collect::<Vec<_>>(), [0, 0], "one connection");
    }

    #[test]
    fn only_plain_http_without_a_proxy() {
        let none = HeaderMap::new();
        let https = reqwest::Url::parse("https://example.invalid/x").unwrap();
        assert!(Http1::new(&https, &none, 1, Duration::from_secs(1)).is_none());
        let mut headers = HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        headers.insert(RANGE, HeaderValue::from_static("bytes=0-0"));
        let h = Http1::new(&reqwest::Url::parse("http://[::1]:8080/a/b?sig=1").unwrap(), &headers, 1, Duration::from_secs(1));
        if PROXY_VARS.iter().any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty())) {
            assert!(h.is_none(), "with a proxy set, requests go through reqwest");
            return;
        }
        let h = h.expect("plain http");
        let head = String::from_utf8(h.head.clone()).unwrap();
        assert!(head.starts_with("GET /a/b?sig=1 HTTP/1.1\r\nHost: [::1]:8080\r\n"), "{head}");
        assert!(head.contains("authorization: Bearer t\r\n"), "{head}");
        assert!(!head.contains("range"), "the caller's Range is not sent: {head}");
        assert_eq!((h.host.as_str(), h.port), ("::1", 8080));
    }
}
