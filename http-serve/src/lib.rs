//! `lazy-image serve`: a static file server that answers HEAD and single-range GETs with ETag and
//! Last-Modified, the subset of HTTP the engine needs from an origin (and, later, from peers).
//! A `Faults` plan can be attached to make it misbehave in the ways real servers and proxies do;
//! `proxy` adds fixed latency in each direction for benchmarks on loopback.

mod faults;
pub mod proxy;

pub use faults::Faults;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, std::io::Error>;

/// A running server; dropping the handle does not stop it, `shutdown` does.
pub struct ServerHandle {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    pub fn shutdown(&self) {
        self.task.abort();
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{}", self.addr, name)
    }
}

/// Binds `addr` and serves files under `root` (with optional faults) on the current runtime.
pub async fn spawn(root: impl Into<PathBuf>, addr: SocketAddr, faults: Option<Arc<Faults>>) -> std::io::Result<ServerHandle> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let root = Arc::new(root.into());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let root = root.clone();
            let faults = faults.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(req, root.clone(), faults.clone()));
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(ServerHandle { addr, task })
}

fn resolve(root: &Path, uri_path: &str) -> Option<PathBuf> {
    let rel = Path::new(uri_path.trim_start_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(root.join(rel))
}

fn simple(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r
}

/// Parses a single `bytes=` range against `size`; `Err(())` means unsatisfiable, `Ok(None)`
/// means serve the whole file (no Range, or a multi-range we do not support).
fn parse_range(v: Option<&HeaderValue>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = v.and_then(|v| v.to_str().ok()).and_then(|s| s.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size.checked_sub(1).ok_or(())?)
    } else {
        let first: u64 = a.parse().map_err(|_| ())?;
        let last = if b.is_empty() { size.saturating_sub(1) } else { b.parse::<u64>().map_err(|_| ())?.min(size.saturating_sub(1)) };
        (first, last)
    };
    if range.0 >= size || range.0 > range.1 {
        return Err(());
    }
    Ok(Some(range))
}

async fn handle(req: Request<Incoming>, root: Arc<PathBuf>, faults: Option<Arc<Faults>>) -> Result<Response<Body>, std::io::Error> {
    let plan = match &faults {
        Some(f) => {
            let h = |name| req.headers().get(name).and_then(|v: &http::HeaderValue| v.to_str().ok());
            f.next_request(req.uri().path(), h(header::RANGE), h(header::AUTHORIZATION)).await?
        }
        None => faults::Plan::default(),
    };
    if let Some(status) = plan.status {
        let mut r = simple(status, "injected failure");
        for (name, value) in &plan.headers {
            if let Ok(v) = HeaderValue::from_str(value) {
                r.headers_mut().insert(*name, v);
            }
        }
        return Ok(r);
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Ok(simple(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD"));
    }
    let Some(path) = resolve(&root, plan.path.as_deref().unwrap_or(req.uri().path())) else {
        return Ok(simple(StatusCode::BAD_REQUEST, "bad path"));
    };
    let Ok(md) = tokio::fs::metadata(&path).await else {
        return Ok(simple(StatusCode::NOT_FOUND, "not found"));
    };
    if !md.is_file() {
        return Ok(simple(StatusCode::NOT_FOUND, "not a file"));
    }
    let size = md.len();
    let etag = plan.etag.unwrap_or_else(|| format!("\"{:x}-{:x}\"", md.mtime(), size));
    let mut builder = Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, etag)
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if let Ok(t) = md.modified() {
        builder = builder.header(header::LAST_MODIFIED, httpdate::fmt_http_date(t));
    }
    let range = if plan.ignore_range { Ok(None) } else { parse_range(req.headers().get(header::RANGE), size) };
    let (status, first, len) = match range {
        Err(()) => {
            return Ok(builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .body(Empty::new().map_err(|e| match e {}).boxed())
                .unwrap_or_else(|_| simple(StatusCode::INTERNAL_SERVER_ERROR, "response")));
        }
        Ok(None) => (StatusCode::OK, 0, size),
        Ok(Some((a, b))) => {
            let shift = if plan.wrong_content_range { 1 } else { 0 };
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {}-{}/{size}", a + shift, b + shift));
            (StatusCode::PARTIAL_CONTENT, a, b - a + 1)
        }
    };
    builder = builder.status(status);
    // Without a length hyper frames the body in chunks.
    if !plan.chunked {
        builder = builder.header(header::CONTENT_LENGTH, len);
    }
    if req.method() == Method::HEAD {
        return Ok(builder
            .body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap_or_else(|_| simple(StatusCode::INTERNAL_SERVER_ERROR, "response")));
    }
    let mut file = tokio::fs::File::open(&path).await?;
    file.seek(std::io::SeekFrom::Start(first)).await?;
    // A truncated body stops early and then errors, which makes hyper close the connection.
    let send = if plan.truncate { len / 2 } else { len };
    let stream = futures::stream::unfold((file, send, plan.truncate), |(mut f, left, trunc)| async move {
        if left == 0 {
            return trunc.then(|| (Err(std::io::Error::other("injected truncation")), (f, 0, false)));
        }
        let mut buf = vec![0u8; left.min(256 << 10) as usize];
        match f.read_exact(&mut buf).await {
            Ok(_) => {
                let n = buf.len() as u64;
                Some((Ok(Frame::data(Bytes::from(buf))), (f, left - n, trunc)))
            }
            Err(e) => Some((Err(e), (f, 0, false))),
        }
    });
    let body = BodyExt::boxed(StreamBody::new(stream));
    Ok(builder.body(body).unwrap_or_else(|_| simple(StatusCode::INTERNAL_SERVER_ERROR, "response")))
}

#[cfg(test)]
mod tests {
    use super::parse_range;
    use http::HeaderValue;

    fn r(s: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
        parse_range(Some(&HeaderValue::from_str(s).unwrap()), size)
    }

    #[test]
    fn range_forms() {
        assert_eq!(r("bytes=0-0", 10), Ok(Some((0, 0))));
        assert_eq!(r("bytes=5-", 10), Ok(Some((5, 9))));
        assert_eq!(r("bytes=-3", 10), Ok(Some((7, 9))));
        assert_eq!(r("bytes=8-100", 10), Ok(Some((8, 9))));
        assert_eq!(r("bytes=10-11", 10), Err(()));
        assert_eq!(r("bytes=0-1,3-4", 10), Ok(None));
        assert_eq!(parse_range(None, 10), Ok(None));
    }
}
