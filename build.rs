//! Compiles the API protos with `protox` (no system `protoc`) into tonic server and client
//! code, the proto3 JSON mapping of the messages (`pbjson`, for the Connect protocol), and writes
//! the descriptor set that the reflection service serves. On linux-gnu it also links the
//! binaries with their relative relocations packed.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/passwordrecovery/v1/password_recovery.proto",
        "proto/passwordrecovery/v1/error_reason.proto",
    ];
    println!("cargo:rerun-if-changed=proto");

    // A position-independent binary's relative relocations packed (DT_RELR, glibc 2.36+):
    // the loader reads a few kilobytes instead of the 0.8 MB `.rela.dyn` at every start.
    if std::env::var("CARGO_CFG_TARGET_OS")? == "linux"
        && std::env::var("CARGO_CFG_TARGET_ENV")? == "gnu"
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }

    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let encoded = fds.encode_to_vec();
    std::fs::write(out_dir.join("password_recovery_descriptor.bin"), &encoded)?;

    // Proto3 JSON: lowerCamelCase out, both spellings in, enums by name, unknown fields refused.
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .build(&[".passwordrecovery"])?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
