//! Compiles the API protos with `protox` (no system `protoc`) into tonic server and client
//! code, the proto3 JSON mapping of the messages (`pbjson`, for the Connect protocol), and writes
//! the descriptor set that the reflection service serves. On linux-gnu it also links the
//! binaries with their relative relocations packed and, where rustc links with lld, their
//! functions in the order they run (`link/symbol-order.txt`).

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/passwordrecovery/v1/password_recovery.proto",
        "proto/passwordrecovery/v1/error_reason.proto",
    ];
    println!("cargo:rerun-if-changed=proto");

    let target = |key: &str| std::env::var(format!("CARGO_CFG_TARGET_{key}")).unwrap_or_default();
    if target("OS") == "linux" && target("ENV") == "gnu" {
        // A position-independent binary's relative relocations packed (DT_RELR, glibc 2.36+):
        // the loader reads a few kilobytes instead of the 0.8 MB `.rela.dyn` at every start.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");

        // The functions that run from start-up through the calls laid out side by side. The
        // kernel maps a binary's cached pages around each page faulted in, so code run from
        // here and there keeps most of the binary resident (8.0 MiB of code at idle, 4.4 MiB
        // laid out). rustc links x86_64 linux-gnu with its own lld, which reads the file;
        // another linker chosen in RUSTFLAGS is left alone. Names the build no longer has
        // (after a toolchain or dependency change) are skipped: `make symbol-order` renews it.
        let order = "link/symbol-order.txt";
        println!("cargo:rerun-if-changed={order}");
        println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
        let rustflags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
        if target("ARCH") == "x86_64"
            && !rustflags.contains("linker")
            && !rustflags.contains("fuse-ld")
            && std::path::Path::new(order).exists()
        {
            let order = std::fs::canonicalize(order)?;
            println!(
                "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
                order.display()
            );
            println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
        }
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
