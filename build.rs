//! Compiles the API protos with `protox` (no system `protoc`) into tonic server and client
//! code, the proto3 JSON mapping of the messages (`pbjson`, for the Connect protocol), and writes
//! the descriptor set that the reflection service serves. On linux-gnu it also links the
//! binaries with their relative relocations packed and, where rustc links with its own lld,
//! the functions that run side by side (`link/symbol-order.txt`).

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

        // The functions that run, from start-up through the calls, laid out side by side. The
        // kernel maps a binary's cached pages around each page faulted in, so code run from
        // here and there keeps most of the binary resident (8 MiB of code at idle, 4.4 MiB
        // laid out). Only where rustc links with its own lld, which reads the file: x86_64
        // linux-gnu, with no other linker chosen (`target.<triple>.linker`, RUSTFLAGS). Names
        // the build no longer has (after a toolchain or dependency change) are skipped:
        // `make symbol-order` renews the file.
        let order = "link/symbol-order.txt";
        println!("cargo:rerun-if-changed={order}");
        println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
        println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
        let rustflags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
        if std::env::var("TARGET")? == "x86_64-unknown-linux-gnu"
            && std::env::var_os("RUSTC_LINKER").is_none()
            && !rustflags.contains("linker")
            && !rustflags.contains("fuse-ld")
            && links_with_its_own_lld()
            && std::path::Path::new(order).exists()
        {
            let order = std::fs::canonicalize(order)?;
            // As two arguments, so that no comma in the path splits it.
            for arg in [
                "-Xlinker".into(),
                format!("--symbol-ordering-file={}", order.display()),
                "-Xlinker".into(),
                "--no-warn-symbol-ordering".into(),
            ] {
                println!("cargo:rustc-link-arg-bins={arg}");
            }
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

/// Whether this rustc carries the lld it links x86_64 linux-gnu with (rustup's toolchains
/// do, and use it since 1.90; a rustc a distribution built may not).
fn links_with_its_own_lld() -> bool {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    std::process::Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .is_some_and(|output| {
            let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            let host = std::env::var("HOST").unwrap_or_default();
            std::path::Path::new(&sysroot)
                .join(format!("lib/rustlib/{host}/bin/gcc-ld/ld.lld"))
                .exists()
        })
}
