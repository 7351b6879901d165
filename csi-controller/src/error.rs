//! Errors of the controller's operations: a kind (which decides the gRPC code, in exactly one
//! place: `From<ControllerError> for tonic::Status`) and a message for `kubectl describe`.

use lazy_image_engine::{Error as EngineError, ErrorKind as EngineKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request, its parameters or the image's attributes are malformed or unsupported.
    InvalidArgument,
    /// The LazyImage, claim or image does not exist.
    NotFound,
    /// The volume name is taken by a volume of other parameters.
    AlreadyExists,
    /// The claim asks for more room than the image holds.
    OutOfRange,
    /// Valid, but not servable now (e.g. no Kubernetes API to read a claim from).
    FailedPrecondition,
    /// Another call on the same volume name is in progress.
    Busy,
    /// A ListVolumes token this controller did not give out (the listing changed meanwhile).
    Aborted,
    /// The origin or the API server cannot be reached; retrying later may work.
    Unavailable,
    /// The origin refused the credentials.
    PermissionDenied,
    Internal,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ControllerError {
    pub kind: Kind,
    pub message: String,
}

pub type Result<T, E = ControllerError> = std::result::Result<T, E>;

impl ControllerError {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        ControllerError { kind, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidArgument, message)
    }

    /// An engine failure (probing an origin) while working on `what`.
    pub fn engine(what: &str, e: &EngineError) -> Self {
        let kind = match e.kind() {
            EngineKind::InvalidInput | EngineKind::RangeUnsupported => Kind::InvalidArgument,
            EngineKind::NotFound | EngineKind::OriginStatus(404) | EngineKind::OriginStatus(410) => Kind::NotFound,
            EngineKind::OriginStatus(401) | EngineKind::OriginStatus(403) => Kind::PermissionDenied,
            EngineKind::OriginStatus(s) if s >= 500 || s == 408 || s == 429 => Kind::Unavailable,
            EngineKind::Transport | EngineKind::DeadlineExceeded | EngineKind::Protocol => Kind::Unavailable,
            EngineKind::OriginStatus(_) | EngineKind::OriginChanged | EngineKind::ReadOnly => Kind::FailedPrecondition,
            EngineKind::NoSpace => Kind::Internal,
            EngineKind::Integrity | EngineKind::CacheBusy | EngineKind::CacheIo => Kind::Internal,
        };
        Self::new(kind, format!("{what}: {}", e.report()))
    }

    /// A Kubernetes API failure while working on `what`.
    pub fn kube(what: &str, e: &kube::Error) -> Self {
        let kind = match e {
            kube::Error::Api(s) if s.code == 404 => Kind::NotFound,
            kube::Error::Api(s) if s.code == 403 || s.code == 401 => Kind::PermissionDenied,
            _ => Kind::Unavailable,
        };
        Self::new(kind, format!("{what}: {e}"))
    }
}

impl From<lazy_image_csi_common::attributes::Invalid> for ControllerError {
    fn from(e: lazy_image_csi_common::attributes::Invalid) -> Self {
        Self::invalid(e.0)
    }
}

impl From<ControllerError> for tonic::Status {
    fn from(e: ControllerError) -> Self {
        let code = match e.kind {
            Kind::InvalidArgument => tonic::Code::InvalidArgument,
            Kind::NotFound => tonic::Code::NotFound,
            Kind::AlreadyExists => tonic::Code::AlreadyExists,
            Kind::OutOfRange => tonic::Code::OutOfRange,
            Kind::FailedPrecondition => tonic::Code::FailedPrecondition,
            Kind::Busy | Kind::Aborted => tonic::Code::Aborted,
            Kind::Unavailable => tonic::Code::Unavailable,
            Kind::PermissionDenied => tonic::Code::PermissionDenied,
            Kind::Internal => tonic::Code::Internal,
        };
        tonic::Status::new(code, e.message)
    }
}
