//! The API contract is checked, not hoped for: its style by `buf lint` (STANDARD rules, with
//! only SERVICE_SUFFIX excepted, and ErrorReason's unprefixed values, see `buf.yaml`) and
//! `buf format`, and its compatibility by `buf breaking` (FILE rules: wire, JSON and generated
//! code) against `proto/released.binpb`, the image of the last released version's proto. `buf`
//! comes from the npm package `@bufbuild/buf`, which `make test` installs into `node_modules/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::tools::{buf, run_to_end};

fn run_buf(args: &[&str]) -> (bool, String) {
    run_buf_in(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

fn run_buf_in(dir: &Path, args: &[&str]) -> (bool, String) {
    run_to_end(Command::new(buf()).args(args).current_dir(dir))
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

fn released_image() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/released.binpb")
}

#[test]
fn the_proto_breaks_nothing_the_last_release_promised() {
    let against = released_image();
    let (ok, findings) = run_buf(&["breaking", "--against", against.to_str().unwrap()]);
    assert!(
        ok,
        "buf breaking against the last release (proto/released.binpb):\n{findings}\nA \
         breaking change needs a new package version (passwordrecovery.v2), not an edit of v1."
    );
}

/// A copy of the module in a temporary directory, with `edit` applied to the service's proto.
fn edited_module(edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("proto/passwordrecovery/v1");
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::copy(root.join("buf.yaml"), dir.path().join("buf.yaml")).unwrap();
    for file in ["password_recovery.proto", "error_reason.proto"] {
        let text = std::fs::read_to_string(root.join("proto/passwordrecovery/v1").join(file));
        let text = text.unwrap();
        let text = match file {
            "password_recovery.proto" => edit(text),
            _ => text,
        };
        std::fs::write(v1.join(file), text).unwrap();
    }
    dir
}

#[test]
fn a_wire_or_json_breaking_change_fails_the_check() {
    let against = released_image();
    let against = against.to_str().unwrap();
    // Each edit would break a client built against the release, on the wire or in JSON.
    for (edit, rule) in [
        (
            ("string username = 1;", "string username = 9;"),
            "FIELD_NO_DELETE",
        ),
        (
            ("string username = 1;", "string user_name = 1;"),
            "FIELD_SAME_JSON_NAME",
        ),
        (
            ("string request_id = 6;", "int64 request_id = 6;"),
            "FIELD_SAME_TYPE",
        ),
        (("DELIVERY_MEDIUM_SMS = 2;", ""), "ENUM_VALUE_NO_DELETE"),
    ] {
        let (from, to) = edit;
        let module = edited_module(|text| {
            assert!(text.contains(from), "{from}");
            text.replacen(from, to, 1)
        });
        let (ok, findings) = run_buf_in(
            module.path(),
            &["breaking", "--against", against, "--error-format", "json"],
        );
        assert!(!ok, "{from} -> {to} passed buf breaking");
        assert!(
            findings.contains(&format!("\"type\":\"{rule}\"")),
            "{from} -> {to}: {findings}"
        );
    }
    // Adding is not breaking.
    let module = edited_module(|text| {
        text.replacen(
            "DELIVERY_MEDIUM_SMS = 2;",
            "DELIVERY_MEDIUM_SMS = 2;\n  DELIVERY_MEDIUM_VOICE = 3;",
            1,
        )
    });
    let (ok, findings) = run_buf_in(module.path(), &["breaking", "--against", against]);
    assert!(ok, "{findings}");
}
