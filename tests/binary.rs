//! Tests of the real `password-recovery` binary as operators run it: configuration from the
//! environment, one-line start-up errors with exit code 2, JSON log lines free of secrets and
//! usernames, no AWS credentials anywhere, and exit code 0 after SIGTERM; and the shipped
//! build keeping the code it runs side by side.

mod common;

use std::time::Duration;

use common::process::{ServiceProcess, command};
use common::{CLIENT_ID, FakeCognito, Reply, forgot};
use password_recovery::proto::v1::ConfirmForgotPasswordRequest;
use serde_json::Value;

const SECRET: &str = "binary-test-client-secret-value";

async fn exit_with_stderr(vars: &[(&str, &str)]) -> (i32, String) {
    let output = tokio::time::timeout(Duration::from_secs(20), command(vars).output())
        .await
        .expect("exits")
        .expect("runs");
    (
        output.status.code().expect("an exit code"),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test]
async fn a_missing_client_id_stops_start_up_with_one_line_naming_it() {
    let (code, stderr) = exit_with_stderr(&[("AWS_REGION", "us-east-1")]).await;
    assert_eq!(code, 2);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("COGNITO_CLIENT_ID"), "{stderr}");
}

#[tokio::test]
async fn a_missing_region_stops_start_up_naming_aws_region() {
    let (code, stderr) = exit_with_stderr(&[("COGNITO_CLIENT_ID", CLIENT_ID)]).await;
    assert_eq!(code, 2);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("AWS_REGION"), "{stderr}");
}

#[tokio::test]
async fn malformed_settings_stop_start_up_naming_the_setting() {
    let base = [
        ("COGNITO_CLIENT_ID", CLIENT_ID),
        ("AWS_REGION", "us-east-1"),
    ];
    for (name, value) in [
        ("SHUTDOWN_GRACE_PERIOD", "20"),
        ("GRPC_LISTEN_ADDR", "not-an-address"),
        ("ENUMERATION_PROTECTION", "maybe"),
        ("LOG_FORMAT", "xml"),
        ("RUST_LOG", "info,[bad"),
        ("AWS_ENDPOINT_URL", "localhost:5000"),
        ("COGNITO_CLIENT_SECRET_FILE", "/nonexistent/secret"),
    ] {
        let mut vars = base.to_vec();
        vars.push((name, value));
        let (code, stderr) = exit_with_stderr(&vars).await;
        assert_eq!(code, 2, "{name}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
        assert!(stderr.contains(name), "{name}: {stderr}");
    }

    let mut vars = base.to_vec();
    vars.extend([
        ("COGNITO_CLIENT_SECRET", SECRET),
        ("COGNITO_CLIENT_SECRET_FILE", "/etc/hostname"),
    ]);
    let (code, stderr) = exit_with_stderr(&vars).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(!stderr.contains(SECRET));
}

#[tokio::test]
async fn the_binary_serves_logs_json_without_secrets_and_exits_zero_on_sigterm() {
    // Arrange
    let cognito = FakeCognito::start().await;
    let service = ServiceProcess::start(&[
        ("COGNITO_CLIENT_ID", CLIENT_ID),
        ("COGNITO_CLIENT_SECRET", SECRET),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", &cognito.url),
    ])
    .await;
    let mut client = service.client().await;
    let username = "zelda.secretive@example.com";
    let code = "918273";
    let password = "Sup3r-Secret-Passw0rd!";

    // Act: one success of each, and one failure.
    client.forgot_password(forgot(username)).await.expect("OK");
    let confirm = ConfirmForgotPasswordRequest {
        username: username.into(),
        confirmation_code: code.into(),
        password: password.into(),
        ..Default::default()
    };
    client
        .confirm_forgot_password(confirm.clone())
        .await
        .expect("OK");
    cognito.script([Reply::error("CodeMismatchException")]);
    client.confirm_forgot_password(confirm).await.unwrap_err();
    drop(client);

    let (status, lines, stderr) = service.terminate().await;

    // Assert
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    let entries: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let calls: Vec<&Value> = entries
        .iter()
        .filter(|e| e["target"] == "password_recovery::api::call" && e.get("grpc.method").is_some())
        .collect();
    assert_eq!(calls.len(), 3, "one line per call: {lines:#?}");
    for call in &calls {
        assert!(call["latency_ms"].as_f64().is_some(), "{call}");
        let request_id = call["span"]["request_id"].as_str().expect("request id");
        assert_eq!(request_id.len(), 36, "a generated UUID: {call}");
        assert_eq!(call["user"].as_str().map(str::len), Some(32), "{call}");
    }
    assert_eq!(calls[0]["grpc.method"], "ForgotPassword");
    assert_eq!(calls[0]["grpc.code"], "OK");
    assert_eq!(calls[2]["grpc.code"], "INVALID_ARGUMENT");
    assert_eq!(calls[0]["level"], "INFO");
    assert_eq!(calls[2]["grpc.method"], "ConfirmForgotPassword");
    assert_eq!(calls[2]["reason"], "CODE_MISMATCH");
    assert_eq!(calls[2]["level"], "WARN");
    assert_eq!(calls[0]["user"], calls[2]["user"], "one pseudonym per user");
    assert!(entries.iter().any(|e| e["message"] == "stopped"));

    let everything = format!("{}\n{stderr}", lines.join("\n"));
    for secret in [SECRET, code, password, username, "zelda"] {
        assert!(
            !everything.contains(secret),
            "{secret:?} leaked into the logs"
        );
    }
    let recorded = cognito.recorded();
    assert!(
        recorded.iter().all(|r| !r.signed),
        "no credentials were used"
    );
}

#[tokio::test]
async fn every_problem_of_the_clients_file_is_one_line_naming_alias_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let client = |alias: &str, id: &str, extra: &str| {
        format!(
            "[clients.{alias}]\nclient_id = \"{id}\"\nuser_pool_id = \"eu-west-1_Pool\"\n\
             region = \"eu-west-1\"\n{extra}\n"
        )
    };
    let cases = [
        (
            format!(
                "default = \"a\"\n{}{}",
                client("a", "one", ""),
                client("b", "one", "")
            ),
            "clients.b.client_id",
        ),
        (
            format!("{}{}", client("a", "one", ""), client("b", "two", "")),
            "default",
        ),
        (
            client("a", "one", "secret_file = \"/nonexistent/web\""),
            "clients.a.secret_file",
        ),
        (
            client("a", "one", "").replace("region = \"eu-west-1\"", "region = \"mars-1\""),
            "clients.a.region",
        ),
        (
            client("a", "one", "secrets = \"x\""),
            "unknown field `secrets`",
        ),
    ];
    for (index, (text, named)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("clients-{index}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, stderr) = exit_with_stderr(&[
            ("COGNITO_CLIENTS_FILE", path.to_str().unwrap()),
            ("AWS_REGION", "us-east-1"),
        ])
        .await;
        assert_eq!(code, 2, "{text}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("COGNITO_CLIENTS_FILE"), "{stderr}");
        assert!(stderr.contains(named), "{named} not in {stderr}");
    }

    // Both styles at once.
    let path = dir.path().join("clients-0.toml");
    let (code, stderr) = exit_with_stderr(&[
        ("COGNITO_CLIENTS_FILE", path.to_str().unwrap()),
        ("COGNITO_CLIENT_ID", CLIENT_ID),
        ("AWS_REGION", "us-east-1"),
    ])
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not both"), "{stderr}");
}

#[tokio::test]
async fn every_problem_of_the_callers_file_is_one_line_naming_file_caller_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[callers.\"spiffe://a/b\"]\nclients = [\"web\"]\n",
            "callers.\"spiffe://a/b\".clients",
        ),
        (
            "[callers.a]\nclients = [\"default\"]\nrpcs = [\"SignUp\"]\n",
            "callers.\"a\".rpcs",
        ),
        (
            "[callers.a]\nclients = [\"default\"]\nrate_limit = \"ten\"\n",
            "callers.\"a\".rate_limit",
        ),
        (
            "[callers.a]\nclient = [\"default\"]\n",
            "unknown field `client`",
        ),
    ];
    for (index, (text, named)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("callers-{index}.toml"));
        std::fs::write(&path, text).unwrap();
        let path = path.to_str().unwrap();
        let (code, stderr) = exit_with_stderr(&[
            ("COGNITO_CLIENT_ID", CLIENT_ID),
            ("AWS_REGION", "us-east-1"),
            ("CALLERS_FILE", path),
        ])
        .await;
        assert_eq!(code, 2, "{text}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("CALLERS_FILE: {path}: ")),
            "{stderr}"
        );
        assert!(stderr.contains(named), "{named} not in {stderr}");
    }
    let (code, stderr) = exit_with_stderr(&[
        ("COGNITO_CLIENT_ID", CLIENT_ID),
        ("AWS_REGION", "us-east-1"),
        ("CALLERS_FILE", "/nonexistent/callers.toml"),
    ])
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("CALLERS_FILE: cannot read /nonexistent/callers.toml"),
        "{stderr}"
    );

    // A header naming callers on an address more than the sidecar can reach.
    let header = [
        ("COGNITO_CLIENT_ID", CLIENT_ID),
        ("AWS_REGION", "us-east-1"),
        ("CALLER_IDENTITY_HEADER", "l5d-client-id"),
        ("GRPC_LISTEN_ADDR", "0.0.0.0:0"),
    ];
    let (code, stderr) = exit_with_stderr(&header).await;
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("CALLER_IDENTITY_HEADER: "), "{stderr}");
    assert!(
        stderr.contains("CALLER_IDENTITY_HEADER_ANY_ADDRESS=true"),
        "{stderr}"
    );
}

/// The shipped build keeps the functions that run, from start-up through the calls, side by
/// side (`link/symbol-order.txt`, handed to the linker by build.rs where rustc links with its
/// own lld), and the file still names them: rustc's names change with the toolchain and with
/// the dependencies' versions and features, and every function the file misses is code run
/// from elsewhere in the binary, which keeps more of it resident.
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
#[test]
fn the_shipped_binary_keeps_the_code_it_runs_side_by_side() {
    use common::process::RELEASE_BINARY;

    let common::symbol_order::SymbolOrder {
        rustc: written_for,
        names: ordered,
    } = common::symbol_order::read();
    assert!(
        std::path::Path::new(RELEASE_BINARY).exists(),
        "{RELEASE_BINARY} is missing: run `cargo build --release --locked` (make test does)"
    );
    let tool = |name: &str, args: &[&str]| {
        let output =
            std::process::Command::new(common::tools::tool(name, "apt-get install binutils"))
                .args(args)
                .arg(RELEASE_BINARY)
                .output()
                .unwrap();
        assert!(output.status.success(), "{name}: {output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let comment = tool("readelf", &["--string-dump=.comment"]);
    assert!(
        comment.contains(&format!("rustc version {written_for} ")),
        "link/symbol-order.txt was written for rustc {written_for} (the Dockerfile's), and \
         {RELEASE_BINARY} was built by another ({comment}): build with rustc {written_for}, or \
         renew the file for this one with `make symbol-order` (it moves the Dockerfile along)"
    );
    // `address size type name`, for every symbol with a size.
    let mut placed: Vec<(&str, u64, u64)> = Vec::new();
    let symbols = tool("nm", &["--defined-only", "--print-size"]);
    for line in symbols.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [address, size, _, name] = fields[..]
            && ordered.contains(name)
        {
            let hex = |field| u64::from_str_radix(field, 16).unwrap();
            placed.push((name, hex(address), hex(size)));
        }
    }
    let found: std::collections::HashSet<&str> = placed.iter().map(|(name, ..)| *name).collect();

    assert!(ordered.len() >= 1000, "{} functions listed", ordered.len());
    assert!(
        found.len() * 100 >= ordered.len() * 95,
        "of the {} functions link/symbol-order.txt names, {RELEASE_BINARY} has only {}: a \
         dependency or feature change renamed them. Renew it: make symbol-order",
        ordered.len(),
        found.len()
    );
    let start = placed.iter().map(|(_, address, _)| *address).min().unwrap();
    let end = placed.iter().map(|(_, a, size)| a + size).max().unwrap();
    placed.sort_unstable_by_key(|(_, address, _)| *address);
    placed.dedup_by_key(|(_, address, _)| *address);
    let bytes: u64 = placed.iter().map(|(_, _, size)| size).sum();
    assert!(
        end - start <= bytes + bytes / 10,
        "the listed functions ({bytes} bytes) are spread over {} bytes of {RELEASE_BINARY}: \
         was it linked without the order (see build.rs)?",
        end - start
    );
}
