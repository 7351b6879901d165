//! What the lazy-image CSI node plugin and controller share: the volume attributes (one parser
//! for the context the controller returns and the node plugin stages from), volume ids, and the
//! `:authority` fix every gRPC server on a Unix socket needs.

pub mod attributes;
pub mod uds_authority;

/// The CSI driver name.
pub const DRIVER_NAME: &str = "lazy-image.csi.dev";
