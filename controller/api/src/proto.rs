//! Generated protobuf and gRPC types. Modules mirror the proto packages so that
//! cross-package references resolve.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod istio {
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }
    pub mod security {
        tonic::include_proto!("istio.security");
    }
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

/// Cairn's own resources (waypoints' L7 config).
pub mod cairn {
    pub mod l7 {
        pub mod v1 {
            tonic::include_proto!("cairn.l7.v1");
        }
    }
}

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub use envoy::service::discovery::v3 as discovery;
pub use istio::security;
pub use istio::v1::auth as ca;
pub use istio::workload;
