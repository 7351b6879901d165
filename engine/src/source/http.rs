//! HTTP(S) origin: ranged GETs over pooled keep-alive connections (reqwest + rustls; plain-http
//! ranges on connections of our own, see `http1`).
//! Probing uses `GET Range: bytes=0-0` rather than HEAD, because presigned S3 URLs reject HEAD
//! and the ranged GET proves Range support, size and validator in one round trip.

use super::http1::{Answer, Http1};
use super::{ImageInfo, RangeSink, RangeSource};
use crate::error::{Error, ErrorKind, Result};
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, CONTENT_RANGE, ETAG, LAST_MODIFIED, RANGE};
use http::StatusCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct HttpSourceOptions {
    /// Extra headers sent with every request (e.g. Authorization). Never logged.
    pub headers: HeaderMap,
    pub connect_timeout: Duration,
    /// Per request; the retry policy's deadline bounds the whole fetch.
    pub request_timeout: Duration,
    pub max_idle_per_host: usize,
    /// Read plain-http ranges on our own HTTP/1.1 connections, straight into the run's buffer
    /// (see `http1`); off, every request goes through reqwest.
    pub own_http1: bool,
}

impl Default for HttpSourceOptions {
    fn default() -> Self {
        HttpSourceOptions {
            headers: HeaderMap::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(20),
            max_idle_per_host: 64,
            own_http1: true,
        }
    }
}

pub struct HttpSource {
    url: reqwest::Url,
    client: reqwest::Client,
    headers: HeaderMap,
    request_timeout: Duration,
    /// Our own connections, for plain http without a proxy (and unless turned off).
    http1: Option<Http1>,
    /// Cleared when the origin frames a range otherwise than by Content-Length: reqwest
    /// reads it from then on.
    http1_ok: AtomicBool,
}

impl HttpSource {
    pub fn new(url: &str, opts: HttpSourceOptions) -> Result<Self> {
        let url = reqwest::Url::parse(url).map_err(|e| Error::with_source(ErrorKind::InvalidInput, format!("image URL {url:?}"), e))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::new(ErrorKind::InvalidInput, format!("image URL {url}: scheme must be http or https")));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .timeout(opts.request_timeout)
            .pool_max_idle_per_host(opts.max_idle_per_host)
            .tcp_nodelay(true)
            // Transparent decompression would break byte ranges.
            .no_gzip()
            .build()
            .map_err(|e| Error::with_source(ErrorKind::InvalidInput, "building the HTTP client", e))?;
        let http1 = opts.own_http1.then(|| Http1::new(&url, &opts.headers, opts.max_idle_per_host, opts.connect_timeout)).flatten();
        Ok(HttpSource { url, client, headers: opts.headers, request_timeout: opts.request_timeout, http1, http1_ok: AtomicBool::new(true) })
    }

    /// Our own HTTP/1.1 connections, while they serve this origin.
    fn http1(&self) -> Option<&Http1> {
        self.http1.as_ref().filter(|_| self.http1_ok.load(Ordering::Relaxed))
    }

    async fn ranged_get(&self, first: u64, last: u64) -> Result<reqwest::Response> {
        self.client
            .get(self.url.clone())
            .headers(self.headers.clone())
            .header(RANGE, format!("bytes={first}-{last}"))
            .send()
            .await
            .map_err(|e| Error::with_source(ErrorKind::Transport, self.describe(), e))
    }
}

/// Judges the answer to a GET of bytes `offset..=last` before its body is taken: a 206 for
/// exactly that range of the version `expect` describes.
fn check_range_answer(status: StatusCode, headers: &HeaderMap, offset: u64, last: u64, expect: &ImageInfo, source: &str) -> Result<()> {
    let what = || format!("{source} bytes {offset}-{last}");
    match status {
        StatusCode::PARTIAL_CONTENT => {}
        StatusCode::OK => return Err(Error::new(ErrorKind::RangeUnsupported, format!("{}: answered 200 to a Range request", what()))),
        StatusCode::RANGE_NOT_SATISFIABLE | StatusCode::PRECONDITION_FAILED => {
            return Err(Error::new(ErrorKind::OriginChanged, format!("{}: HTTP {status}", what())))
        }
        s => return Err(Error::new(ErrorKind::OriginStatus(s.as_u16()), what())),
    }
    let cr = header_str(headers, CONTENT_RANGE);
    let (range, total) = cr
        .as_deref()
        .and_then(parse_content_range)
        .ok_or_else(|| Error::new(ErrorKind::Protocol, format!("{}: bad Content-Range {cr:?}", what())))?;
    expect.check_same(&info_from(headers, total), source)?;
    if range != Some((offset, last)) {
        return Err(Error::new(ErrorKind::Protocol, format!("{}: answered Content-Range {cr:?}", what())));
    }
    Ok(())
}

/// Parses `bytes FIRST-LAST/TOTAL` (or `bytes */TOTAL`) into (Some((first, last)), total).
fn parse_content_range(v: &str) -> Option<(Option<(u64, u64)>, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let total = total.trim().parse().ok()?;
    if range.trim() == "*" {
        return Some((None, total));
    }
    let (a, b) = range.split_once('-')?;
    Some((Some((a.trim().parse().ok()?, b.trim().parse().ok()?)), total))
}

fn header_str(h: &HeaderMap, name: HeaderName) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn info_from(h: &HeaderMap, size: u64) -> ImageInfo {
    ImageInfo { size, etag: header_str(h, ETAG), last_modified: header_str(h, LAST_MODIFIED) }
}

#[async_trait]
impl RangeSource for HttpSource {
    fn describe(&self) -> String {
        // Query strings of presigned URLs carry credentials: keep them out of logs.
        let mut u = self.url.clone();
        u.set_query(None);
        u.to_string()
    }

    async fn probe(&self) -> Result<ImageInfo> {
        let resp = self.ranged_get(0, 0).await?;
        let status = resp.status();
        let cr = header_str(resp.headers(), CONTENT_RANGE);
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let (_, total) = cr.as_deref().and_then(parse_content_range).ok_or_else(|| {
                    Error::new(ErrorKind::Protocol, format!("{}: 206 without a valid Content-Range ({cr:?})", self.describe()))
                })?;
                Ok(info_from(resp.headers(), total))
            }
            StatusCode::OK => Err(Error::new(
                ErrorKind::RangeUnsupported,
                format!("{} answered 200 with the whole body to a Range request; refusing to download it", self.describe()),
            )),
            StatusCode::RANGE_NOT_SATISFIABLE => {
                Err(Error::new(ErrorKind::InvalidInput, format!("{} is empty (Content-Range {cr:?})", self.describe())))
            }
            s => Err(Error::new(ErrorKind::OriginStatus(s.as_u16()), self.describe())),
        }
    }

    async fn fetch(&self, offset: u64, len: u64, expect: &ImageInfo) -> Result<Bytes> {
        let buf = super::RangeBuf::new(len as usize);
        self.fetch_to(offset, len, expect, &buf).await?;
        Ok(buf.take())
    }

    async fn fetch_to(&self, offset: u64, len: u64, expect: &ImageInfo, sink: &dyn RangeSink) -> Result<()> {
        let last = offset + len - 1;
        let source = self.describe();
        let what = || format!("{source} bytes {offset}-{last}");
        if let Some(http1) = self.http1() {
            let check = |status, headers: &HeaderMap| check_range_answer(status, headers, offset, last, expect, &source);
            let answer =
                tokio::time::timeout(self.request_timeout, http1.fetch_to(offset, last, sink, check, &what)).await.map_err(|_| {
                    Error::new(ErrorKind::Transport, format!("{}: no whole answer within {:?}", what(), self.request_timeout))
                })??;
            match answer {
                Answer::Read => return Ok(()),
                Answer::NotPlain => {
                    self.http1_ok.store(false, Ordering::Relaxed);
                    tracing::info!(origin = %source, "the origin sends ranges without a Content-Length; reading them through reqwest");
                }
            }
        }
        let mut resp = self.ranged_get(offset, last).await?;
        check_range_answer(resp.status(), resp.headers(), offset, last, expect, &source)?;
        // Body pieces go on as they come: the range and the version are checked above, and a
        // piece that would run past the range is refused before any of it is taken.
        let mut got = 0u64;
        loop {
            match resp.chunk().await {
                Ok(Some(part)) => {
                    if got + part.len() as u64 > len || !sink.push(&part) {
                        return Err(Error::new(ErrorKind::Protocol, format!("{}: body longer than asked", what())));
                    }
                    got += part.len() as u64;
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(Error::with_source(ErrorKind::Transport, format!("{}: reading body at {got} of {len} bytes", what()), e))
                }
            }
        }
        if got != len {
            return Err(Error::new(ErrorKind::Protocol, format!("{}: body truncated at {got} of {len} bytes", what())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_content_range;

    #[test]
    fn content_range_forms() {
        assert_eq!(parse_content_range("bytes 0-0/100"), Some((Some((0, 0)), 100)));
        assert_eq!(parse_content_range("bytes 5-9/10"), Some((Some((5, 9)), 10)));
        assert_eq!(parse_content_range("bytes */10"), Some((None, 10)));
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes 0-x/2"), None);
        assert_eq!(parse_content_range("bytes 0-1/*"), None);
    }
}
