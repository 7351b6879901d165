//! Generated gRPC types and services. `csi::v1` is the Container Storage Interface as kubelet and
//! the sidecars speak it.
pub mod csi {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("csi.v1");
    }
}
