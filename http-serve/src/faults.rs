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
    /// While on, requests wait before they are answered (an origin that stalls).
    pub hold: Hold,
    pub etag: Mutex<Option<String>>,
    /// When set, requests without exactly this Authorization header get 401.
    pub require_auth: Mutex<Option<String>>,
    /// Sent as WWW-Authenticate with those 401s (a registry's challenge).
    pub challenge: Mutex<Option<String>>,
    /// Paths starting with this need no Authorization (a token service beside a registry).
    pub auth_exempt: Mutex<Option<String>>,
    /// The next this many requests get 429 with `Retry-After: 1`.
    pub status_429: AtomicU32,
    /// Requests whose path contains this are redirected (307) to a one-use storage URL, as
    /// registries hand out presigned ones: a second use of it gets 403.
    pub redirect_paths: Mutex<Option<String>>,
    pub redirects: AtomicU64,
    tickets: Mutex<std::collections::HashSet<u64>>,
    pub requests: AtomicU64,
    /// The Range header of every request, in order (empty for none).
    pub ranges: Mutex<Vec<String>>,
}

/// A switch that holds requests until it is turned off (all of them, or those whose range
/// covers one offset), counting those it holds.
pub struct Hold {
    on: tokio::sync::watch::Sender<bool>,
    /// Only requests whose range covers this offset are held (`u64::MAX`: all).
    at: AtomicU64,
    waiting: AtomicU64,
}

impl Default for Hold {
    fn default() -> Self {
        Hold { on: tokio::sync::watch::Sender::new(false), at: AtomicU64::new(u64::MAX), waiting: AtomicU64::new(0) }
    }
}

impl Hold {
    pub fn set(&self, on: bool) {
        self.on.send_replace(on);
    }

    /// Holds only the requests whose range covers `offset` (`None`: every request).
    pub fn only_at(&self, offset: Option<u64>) {
        self.at.store(offset.unwrap_or(u64::MAX), SeqCst);
    }

    fn covers(&self, range: Option<&str>) -> bool {
        let at = self.at.load(SeqCst);
        if at == u64::MAX {
            return true;
        }
        let Some((a, b)) = range.and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-')) else { return false };
        match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(a), Ok(b)) => a <= at && at <= b,
            (Ok(a), Err(_)) => a <= at,
            _ => false,
        }
    }

    /// Requests waiting on the switch now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(SeqCst)
    }

    async fn pass(&self, range: Option<&str>) {
        let mut rx = self.on.subscribe();
        if !*rx.borrow_and_update() || !self.covers(range) {
            return;
        }
        self.waiting.fetch_add(1, SeqCst);
        let _ = rx.wait_for(|on| !*on).await;
        self.waiting.fetch_sub(1, SeqCst);
    }
}

#[derive(Default)]
pub(crate) struct Plan {
    pub status: Option<StatusCode>,
    /// Headers to send with `status`.
    pub headers: Vec<(&'static str, String)>,
    /// Serve this path instead of the request's.
    pub path: Option<String>,
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

    pub(crate) async fn next_request(&self, path: &str, range: Option<&str>, authorization: Option<&str>) -> std::io::Result<Plan> {
        self.requests.fetch_add(1, SeqCst);
        self.ranges.lock().unwrap_or_else(|p| p.into_inner()).push(range.unwrap_or_default().to_owned());
        self.hold.pass(range).await;
        let delay = self.delay_ms.load(SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if take(&self.drop_connection) {
            // An error from the service makes hyper close the connection without an answer.
            return Err(std::io::Error::other("injected dropped connection"));
        }
        let lock = |m: &Mutex<Option<String>>| m.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if take(&self.status_429) {
            return Ok(Plan { status: Some(StatusCode::TOO_MANY_REQUESTS), headers: vec![("retry-after", "1".into())], ..Plan::default() });
        }
        // A storage URL handed out by a redirect: good for one request.
        if let Some(rest) = path.strip_prefix("/storage/") {
            let (ticket, inner) = rest.split_once('/').unwrap_or((rest, ""));
            let valid = ticket.parse::<u64>().is_ok_and(|t| self.tickets.lock().unwrap_or_else(|p| p.into_inner()).remove(&t));
            if !valid {
                return Ok(Plan { status: Some(StatusCode::FORBIDDEN), ..Plan::default() });
            }
            return Ok(Plan { path: Some(format!("/{inner}")), ..self.plain_plan() });
        }
        let exempt = lock(&self.auth_exempt).is_some_and(|p| path.starts_with(&p));
        if lock(&self.require_auth).is_some_and(|w| authorization != Some(w.as_str())) && !exempt {
            let headers = lock(&self.challenge).map(|c| vec![("www-authenticate", c)]).unwrap_or_default();
            return Ok(Plan { status: Some(StatusCode::UNAUTHORIZED), headers, ..Plan::default() });
        }
        if lock(&self.redirect_paths).is_some_and(|p| path.contains(&p)) {
            let ticket = self.redirects.fetch_add(1, SeqCst);
            self.tickets.lock().unwrap_or_else(|p| p.into_inner()).insert(ticket);
            let to = format!("/storage/{ticket}{path}");
            return Ok(Plan { status: Some(StatusCode::TEMPORARY_REDIRECT), headers: vec![("location", to)], ..Plan::default() });
        }
        Ok(self.plain_plan())
    }

    fn plain_plan(&self) -> Plan {
        Plan {
            status: take(&self.status_5xx).then_some(StatusCode::SERVICE_UNAVAILABLE),
            truncate: take(&self.truncate),
            wrong_content_range: take(&self.wrong_content_range),
            ignore_range: self.ignore_range.load(SeqCst),
            chunked: self.chunked.load(SeqCst),
            etag: self.etag.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            ..Plan::default()
        }
    }
}
