//! Domain errors of the engine: a kind (what went wrong, which decides retry policy, the errno a
//! block device returns and, later, the gRPC code) plus context (URL, offset, path) plus the cause.
//! Mapping to transport-specific codes happens once, here (`errno`) and in the gRPC layer.

use std::fmt;
use std::sync::Arc;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller asked for something malformed (bad URL, offset past the end, bad manifest).
    InvalidInput,
    /// Connecting to or talking to the origin failed at the transport level.
    Transport,
    /// The origin answered with an HTTP status we cannot use.
    OriginStatus(u16),
    /// The origin answered 200 with the whole body to a Range request.
    RangeUnsupported,
    /// The origin's answer did not match what we asked (bad Content-Range, short body).
    Protocol,
    /// The image at the origin is no longer the one we probed (ETag, Last-Modified or size changed).
    OriginChanged,
    /// Bytes did not match what vouches for them (a manifest digest, a format's checksum), or
    /// an image's own structure is inconsistent.
    Integrity,
    /// The local cache could not be read or written.
    CacheIo,
    /// Another process holds this image's cache.
    CacheBusy,
    /// Retries ran out of time.
    DeadlineExceeded,
    /// Something we looked for does not exist (a local image file, a mount).
    NotFound,
    /// A write to a read-only device.
    ReadOnly,
    /// A writable layer (or the disk under it) is full.
    NoSpace,
}

impl ErrorKind {
    /// Errors worth retrying against the origin: transport failures, 5xx, 408/429, short bodies.
    pub fn is_transient(self) -> bool {
        match self {
            ErrorKind::Transport | ErrorKind::Protocol => true,
            ErrorKind::OriginStatus(s) => s >= 500 || s == 408 || s == 429,
            ErrorKind::InvalidInput
            | ErrorKind::RangeUnsupported
            | ErrorKind::OriginChanged
            | ErrorKind::Integrity
            | ErrorKind::CacheIo
            | ErrorKind::CacheBusy
            | ErrorKind::DeadlineExceeded
            | ErrorKind::NotFound
            | ErrorKind::ReadOnly
            | ErrorKind::NoSpace => false,
        }
    }

    /// The positive errno a block or file read returns for this kind (callers negate for ublk).
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::InvalidInput => libc::EINVAL,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::CacheBusy => libc::EBUSY,
            ErrorKind::DeadlineExceeded => libc::ETIMEDOUT,
            ErrorKind::Transport
            | ErrorKind::OriginStatus(_)
            | ErrorKind::RangeUnsupported
            | ErrorKind::Protocol
            | ErrorKind::OriginChanged
            | ErrorKind::Integrity
            | ErrorKind::CacheIo => libc::EIO,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::InvalidInput => f.write_str("invalid input"),
            ErrorKind::Transport => f.write_str("cannot reach the origin"),
            ErrorKind::OriginStatus(s) => write!(f, "origin answered HTTP {s}"),
            ErrorKind::RangeUnsupported => f.write_str("origin does not support HTTP Range requests"),
            ErrorKind::Protocol => f.write_str("origin sent a malformed answer"),
            ErrorKind::OriginChanged => f.write_str("the image at the origin changed"),
            ErrorKind::Integrity => f.write_str("integrity check failed"),
            ErrorKind::CacheIo => f.write_str("local cache I/O failed"),
            ErrorKind::CacheBusy => f.write_str("cache is in use by another process"),
            ErrorKind::DeadlineExceeded => f.write_str("gave up after retries"),
            ErrorKind::NotFound => f.write_str("not found"),
            ErrorKind::ReadOnly => f.write_str("read-only"),
            ErrorKind::NoSpace => f.write_str("no space left"),
        }
    }
}

/// An engine error. Cloneable so one failed fetch can be reported to every reader waiting on it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}: {context}")]
pub struct Error {
    kind: ErrorKind,
    context: String,
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error { kind, context: context.into(), source: None }
    }

    pub fn with_source(kind: ErrorKind, context: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error { kind, context: context.into(), source: Some(Arc::new(source)) }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn context(&self) -> &str {
        &self.context
    }

    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }

    /// Full sentence including the chain of causes, for logs and CLI output.
    pub fn report(&self) -> String {
        let mut s = self.to_string();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static));
        while let Some(e) = cur {
            s.push_str(": ");
            s.push_str(&e.to_string());
            cur = e.source();
        }
        s
    }

    pub(crate) fn cache_io(context: impl Into<String>, e: std::io::Error) -> Self {
        Error::with_source(ErrorKind::CacheIo, context, e)
    }
}
