//! The API contract's style is checked, not hoped for: `buf lint` (STANDARD rules, with only
//! SERVICE_SUFFIX excepted, see `buf.yaml`) and `buf format` on `proto/`. `buf` comes from the
//! npm package `@bufbuild/buf`, which `make test` installs into `node_modules/`.

mod common;

use std::process::Command;

use common::tools::buf;

fn run_buf(args: &[&str]) -> (bool, String) {
    let output = Command::new(buf())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("buf runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn buf_lint_passes_with_standard_rules() {
    let (files_ok, files) = run_buf(&["ls-files"]);
    assert!(files_ok, "{files}");
    assert!(
        files.contains("passwordrecovery/v1/password_recovery.proto"),
        "buf does not see the API proto: {files}"
    );
    let (ok, findings) = run_buf(&["lint"]);
    assert!(ok, "buf lint:\n{findings}");
}

#[test]
fn protos_are_buf_formatted() {
    let (ok, diff) = run_buf(&["format", "--diff", "--exit-code"]);
    assert!(ok, "run `node_modules/.bin/buf format -w`:\n{diff}");
}
