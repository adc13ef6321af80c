//! The README's client snippets ("Switching on the reason") run against the real binary, in
//! front of the fake Cognito: `tests/client_languages/generate.sh` generates the code of
//! `proto/` with the project's own tools (TypeScript by `buf generate` with the local
//! protoc-gen-es, Python by grpcio-tools' protoc), then a Python client over gRPC (`client.py`)
//! and a TypeScript one over the Connect JSON door (`client.mjs`, connect-node) each make two
//! calls that are refused before Cognito and switch on the generated `ErrorReason` their
//! `ErrorInfo` names. The tools come from `.venv/` and `node_modules/`, which `make test`
//! installs; a missing one fails the test with the step that installs it. Go's snippet is not
//! run: this machine has no Go toolchain.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::FakeCognito;
use common::process::ServiceProcess;
use common::tools::{buf, tool, venv_python};
use tokio::process::Command;

/// What each client prints, one line per call: the reason, its `ErrorReason` number and the
/// branch of its switch.
const EXPECTED: [&str; 2] = [
    "INVALID_REQUEST 1 fix the request",
    "CLIENT_NOT_ALLOWED 2 use a client_id the server serves",
];

/// The clients, their generator and its buf template.
fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/client_languages")
}

/// Runs `command` (at most 120 s) and returns its stdout; panics with its output unless it
/// exits 0.
async fn stdout_of(what: &str, command: &mut Command) -> String {
    command.stdin(Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .unwrap_or_else(|_| panic!("{what} still running after 120 s"))
        .unwrap_or_else(|error| panic!("{what} does not start: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Runs the client `script` with `interpreter` against `addr`, with the code in `generated`.
async fn run_client(interpreter: &Path, script: &str, addr: &str, generated: &Path) -> String {
    let mut command = Command::new(interpreter);
    command.arg(scripts().join(script)).arg(addr).arg(generated);
    stdout_of(script, &mut command).await
}

#[tokio::test]
async fn python_and_typescript_clients_switch_on_the_generated_error_reason() {
    // Arrange: the generated code, and the binary in front of a fake Cognito.
    buf();
    let python = venv_python();
    let node = tool("node", "apt-get install nodejs");
    let generated = tempfile::tempdir().unwrap();
    let mut generate = Command::new("bash");
    generate
        .arg(scripts().join("generate.sh"))
        .arg(generated.path());
    stdout_of("generate.sh", &mut generate).await;
    let cognito = FakeCognito::start().await;
    let service = ServiceProcess::against(&cognito, &[]).await;

    // Act
    let by_python = run_client(&python, "client.py", &service.target, generated.path()).await;
    let by_node = run_client(&node, "client.mjs", &service.target, generated.path()).await;

    // Assert: the same reasons, numbers and branches in both languages; nothing reached Cognito.
    assert_eq!(by_python.lines().collect::<Vec<_>>(), EXPECTED, "client.py");
    assert_eq!(by_node.lines().collect::<Vec<_>>(), EXPECTED, "client.mjs");
    assert!(
        cognito.recorded().is_empty(),
        "the calls reached Cognito: {:?}",
        cognito.recorded()
    );
    service.terminate().await;
}
