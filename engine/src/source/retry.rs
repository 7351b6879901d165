//! Retry policy as code: only transient errors (transport, 5xx, 408/429, malformed or short
//! answers) are retried, with exponential backoff, up to a deadline. A changed origin is never
//! retried: mixing two versions of an image is worse than failing.

use super::{ImageInfo, RangeSink, RangeSource};
use crate::error::{Error, ErrorKind, Result};
use crate::stats::Stats;
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Total time one fetch may take including all retries.
    pub deadline: Duration,
}

impl RetryPolicy {
    pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);
    pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
    pub const DEADLINE: Duration = Duration::from_secs(30);
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { first_backoff: Self::FIRST_BACKOFF, max_backoff: Self::MAX_BACKOFF, deadline: Self::DEADLINE }
    }
}

pub struct Retrying<S: ?Sized> {
    inner: Arc<S>,
    policy: RetryPolicy,
    stats: Arc<Stats>,
}

impl<S: RangeSource + ?Sized> Retrying<S> {
    pub fn new(inner: Arc<S>, policy: RetryPolicy, stats: Arc<Stats>) -> Self {
        Retrying { inner, policy, stats }
    }

    async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let start = Instant::now();
        let mut backoff = self.policy.first_backoff;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let remaining = self.policy.deadline.saturating_sub(start.elapsed());
            let res = match tokio::time::timeout(remaining, op()).await {
                Ok(r) => r,
                Err(_) => Err(Error::new(ErrorKind::Transport, format!("{what}: timed out"))),
            };
            match res {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && start.elapsed() + backoff < self.policy.deadline => {
                    self.stats.count_retry();
                    tracing::debug!(error = %e.report(), attempts, "retrying {what}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.policy.max_backoff);
                }
                Err(e) if e.is_transient() => {
                    return Err(Error::new(
                        ErrorKind::DeadlineExceeded,
                        format!("{what}: {attempts} attempts in {:.1?}, last error: {}", start.elapsed(), e.report()),
                    ))
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[async_trait]
impl<S: RangeSource + ?Sized> RangeSource for Retrying<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn probe(&self) -> Result<ImageInfo> {
        self.run(&format!("probe {}", self.inner.describe()), || self.inner.probe()).await
    }

    async fn fetch(&self, offset: u64, len: u64, expect: &ImageInfo) -> Result<Bytes> {
        let what = format!("fetch {} bytes {offset}+{len}", self.inner.describe());
        self.run(&what, || self.inner.fetch(offset, len, expect)).await
    }

    /// Each retry asks only for what `sink` does not hold yet.
    async fn fetch_to(&self, offset: u64, len: u64, expect: &ImageInfo, sink: &dyn RangeSink) -> Result<()> {
        let what = format!("fetch {} bytes {offset}+{len}", self.inner.describe());
        let start = sink.received();
        self.run(&what, || async move {
            let got = sink.received() - start;
            if got >= len {
                return Ok(());
            }
            self.inner.fetch_to(offset + got, len - got, expect, sink).await
        })
        .await
    }
}
