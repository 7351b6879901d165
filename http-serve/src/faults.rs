//! Fault injection for the test server: each counter makes that many following requests fail in
//! one way (5xx, dropped connection, truncated body, wrong Content-Range), plus switches that stay
//! on (delay, ignore Range, a changed ETag, chunked bodies). Counts the requests and keeps their ranges.

use http::StatusCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
pub struct Faults {
    pub status_5xx: AtomicU32,
    pub drop_connection: AtomicU32,
    pub truncate: AtomicU32,
    pub wrong_content_range: AtomicU32,
    pub ignore_range: AtomicBool,
    /// Bodies framed by chunked encoding rather than a Content-Length (as some origins and
    /// proxies send them).
    pub chunked: AtomicBool,
    pub delay_ms: AtomicU64,
    pub etag: Mutex<Option<String>>,
    pub requests: AtomicU64,
    /// The Range header of every request, in order (empty for none).
    pub ranges: Mutex<Vec<String>>,
}

#[derive(Default)]
pub(crate) struct Plan {
    pub status: Option<StatusCode>,
    pub truncate: bool,
    pub wrong_content_range: bool,
    pub ignore_range: bool,
    pub chunked: bool,
    pub etag: Option<String>,
}

fn take(c: &AtomicU32) -> bool {
    c.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok()
}

impl Faults {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_etag(&self, etag: &str) {
        *self.etag.lock().unwrap_or_else(|p| p.into_inner()) = Some(etag.to_owned());
    }

    /// The Range headers asked for so far.
    pub fn ranges(&self) -> Vec<String> {
        self.ranges.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) async fn next_request(&self, range: Option<&str>) -> std::io::Result<Plan> {
        self.requests.fetch_add(1, SeqCst);
        self.ranges.lock().unwrap_or_else(|p| p.into_inner()).push(range.unwrap_or_default().to_owned());
        let delay = self.delay_ms.load(SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if take(&self.drop_connection) {
            // An error from the service makes hyper close the connection without an answer.
            return Err(std::io::Error::other("injected dropped connection"));
        }
        Ok(Plan {
            status: take(&self.status_5xx).then_some(StatusCode::SERVICE_UNAVAILABLE),
            truncate: take(&self.truncate),
            wrong_content_range: take(&self.wrong_content_range),
            ignore_range: self.ignore_range.load(SeqCst),
            chunked: self.chunked.load(SeqCst),
            etag: self.etag.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }
}
