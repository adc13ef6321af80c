//! Code generated from `proto/` by `build.rs`, and the descriptor set reflection serves.

/// `passwordrecovery.v1`: the service, its messages (with their proto3 JSON form), client and
/// server.
#[allow(missing_docs)]
pub mod v1 {
    tonic::include_proto!("passwordrecovery.v1");
    include!(concat!(env!("OUT_DIR"), "/passwordrecovery.v1.serde.rs"));
}

/// The encoded `FileDescriptorSet` of `proto/`, with source comments, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(
    env!("OUT_DIR"),
    "/password_recovery_descriptor.bin"
));
