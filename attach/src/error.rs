use lazy_image_engine::Error as EngineError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachErrorKind {
    InvalidInput,
    /// The mount point or device is in use.
    Busy,
    /// The image is not a filesystem we can mount.
    UnknownFormat,
    /// A kernel facility (FUSE, loop) is missing or refused.
    Unsupported,
    Io,
    /// Reading the image failed (origin, cache, integrity).
    Engine,
    /// A device or mount we were told about does not exist.
    NotFound,
}

#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct AttachError {
    pub kind: AttachErrorKind,
    pub context: String,
    #[source]
    pub source: Option<EngineError>,
}

impl AttachError {
    pub fn new(kind: AttachErrorKind, context: impl Into<String>) -> Self {
        AttachError { kind, context: context.into(), source: None }
    }

    pub(crate) fn os(context: impl Into<String>, e: std::io::Error) -> Self {
        let kind = match e.raw_os_error() {
            Some(libc::EBUSY) => AttachErrorKind::Busy,
            Some(libc::ENODEV) | Some(libc::ENOENT) | Some(libc::ENOTSUP) => AttachErrorKind::Unsupported,
            Some(libc::EINVAL) => AttachErrorKind::InvalidInput,
            _ => AttachErrorKind::Io,
        };
        AttachError { kind, context: format!("{}: {e}", context.into()), source: None }
    }
}

impl From<EngineError> for AttachError {
    fn from(e: EngineError) -> Self {
        AttachError { kind: AttachErrorKind::Engine, context: e.report(), source: Some(e) }
    }
}
