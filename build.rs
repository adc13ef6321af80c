//! Compiles the API protos with `protox` (no system `protoc`) into tonic server and client
//! code, and writes the descriptor set that the reflection service serves.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/passwordrecovery/v1/password_recovery.proto"];
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("password_recovery_descriptor.bin"),
        fds.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
