//! Generated gRPC code for every O2C service, one module per proto package
//! (`o2c::credit::v1`, …), plus the encoded file descriptor set that server
//! reflection serves.
//!
//! Only the `grpc/` layer of each service imports this crate's types; domain
//! code never sees them.

#![allow(clippy::all, missing_docs)]

pub mod o2c {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("o2c.common.v1");
        }
    }
    pub mod customer {
        pub mod v1 {
            tonic::include_proto!("o2c.customer.v1");
        }
    }
    pub mod credit {
        pub mod v1 {
            tonic::include_proto!("o2c.credit.v1");
        }
    }
    pub mod invoicing {
        pub mod v1 {
            tonic::include_proto!("o2c.invoicing.v1");
        }
    }
    pub mod payments {
        pub mod v1 {
            tonic::include_proto!("o2c.payments.v1");
        }
    }
    pub mod crm_sync {
        pub mod v1 {
            tonic::include_proto!("o2c.crm_sync.v1");
        }
    }
    pub mod events {
        pub mod v1 {
            tonic::include_proto!("o2c.events.v1");
        }
    }
    pub mod gateway {
        pub mod v1 {
            tonic::include_proto!("o2c.gateway.v1");
        }
    }
}

pub use o2c::{common, credit, crm_sync, customer, events, gateway, invoicing, payments};

/// Encoded `FileDescriptorSet` of all O2C protos, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("o2c_descriptor");
