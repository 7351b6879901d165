//! Errors of the node plugin's volume operations: a kind (which decides the gRPC code, in
//! exactly one place: `From<NodeError> for tonic::Status`) and a message that names the volume,
//! path or URL concerned. Engine and attach errors are classified here too, once each.

use lazy_image_attach::{AttachError, AttachErrorKind};
use lazy_image_engine::{Error as EngineError, ErrorKind as EngineKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeErrorKind {
    /// The request or the volume attributes are malformed or unsupported.
    InvalidArgument,
    /// The volume, path or image does not exist.
    NotFound,
    /// The volume is staged or published already, with other arguments.
    AlreadyExists,
    /// The call is valid but not now: volume not staged, backend unusable, image unusable.
    FailedPrecondition,
    /// Another operation on the same volume is in progress.
    Busy,
    /// The node holds as many volumes as it may.
    ResourceExhausted,
    /// The origin cannot be reached or keeps failing; retrying later may work.
    Unavailable,
    /// The origin refused our credentials.
    PermissionDenied,
    /// The image's bytes do not match its pinned manifest.
    Corrupt,
    /// A local failure (mount, device, state files).
    Internal,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct NodeError {
    pub kind: NodeErrorKind,
    pub message: String,
}

pub type NodeResult<T> = Result<T, NodeError>;

impl NodeError {
    pub fn new(kind: NodeErrorKind, message: impl Into<String>) -> Self {
        NodeError { kind, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(NodeErrorKind::InvalidArgument, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(NodeErrorKind::Internal, message)
    }

    /// An engine failure while working on `what` (e.g. "volume v1").
    pub fn engine(what: &str, e: &EngineError) -> Self {
        let kind = match e.kind() {
            EngineKind::InvalidInput | EngineKind::RangeUnsupported => NodeErrorKind::InvalidArgument,
            EngineKind::NotFound | EngineKind::OriginStatus(404) | EngineKind::OriginStatus(410) => NodeErrorKind::NotFound,
            EngineKind::OriginStatus(401) | EngineKind::OriginStatus(403) => NodeErrorKind::PermissionDenied,
            EngineKind::Transport | EngineKind::DeadlineExceeded | EngineKind::Protocol => NodeErrorKind::Unavailable,
            EngineKind::OriginStatus(s) if s >= 500 || s == 408 || s == 429 => NodeErrorKind::Unavailable,
            EngineKind::OriginStatus(_) => NodeErrorKind::FailedPrecondition,
            EngineKind::OriginChanged | EngineKind::CacheBusy => NodeErrorKind::FailedPrecondition,
            EngineKind::Integrity => NodeErrorKind::Corrupt,
            EngineKind::CacheIo => NodeErrorKind::Internal,
            EngineKind::ReadOnly => NodeErrorKind::FailedPrecondition,
            EngineKind::NoSpace => NodeErrorKind::ResourceExhausted,
        };
        NodeError::new(kind, format!("{what}: {}", e.report()))
    }

    /// An attach (device, mount) failure while working on `what`.
    pub fn attach(what: &str, e: &AttachError) -> Self {
        if let (AttachErrorKind::Engine, Some(src)) = (e.kind, e.source.as_ref()) {
            return Self::engine(what, src);
        }
        let kind = match e.kind {
            AttachErrorKind::InvalidInput | AttachErrorKind::UnknownFormat => NodeErrorKind::InvalidArgument,
            AttachErrorKind::NotFound => NodeErrorKind::NotFound,
            AttachErrorKind::Busy | AttachErrorKind::Unsupported => NodeErrorKind::FailedPrecondition,
            AttachErrorKind::Io | AttachErrorKind::Engine => NodeErrorKind::Internal,
        };
        NodeError::new(kind, format!("{what}: {e}"))
    }
}

impl From<lazy_image_csi_common::attributes::Invalid> for NodeError {
    fn from(e: lazy_image_csi_common::attributes::Invalid) -> Self {
        NodeError::invalid(e.0)
    }
}

impl From<NodeError> for tonic::Status {
    fn from(e: NodeError) -> Self {
        let code = match e.kind {
            NodeErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
            NodeErrorKind::NotFound => tonic::Code::NotFound,
            NodeErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
            NodeErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
            NodeErrorKind::Busy => tonic::Code::Aborted,
            NodeErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
            NodeErrorKind::Unavailable => tonic::Code::Unavailable,
            NodeErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
            NodeErrorKind::Corrupt => tonic::Code::DataLoss,
            NodeErrorKind::Internal => tonic::Code::Internal,
        };
        tonic::Status::new(code, e.message)
    }
}
