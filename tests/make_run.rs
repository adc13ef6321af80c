//! `make run`'s stack (`scripts/dev_stack.py`) as a new user meets it: it starts moto and the
//! service, prints grpcurl and curl commands that work as printed, and leaves nothing running after
//! SIGTERM; a taken port is reported clearly.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::free_port;
use common::process::BINARY;
use common::tools::venv_python;

fn dev_stack(grpc_port: u16, moto_port: u16) -> Child {
    let metrics_port = free_port();
    Command::new(venv_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dev_stack.py"))
        .args(["--binary", BINARY])
        .args(["--grpc-port", &grpc_port.to_string()])
        .args(["--moto-port", &moto_port.to_string()])
        .args(["--metrics-port", &metrics_port.to_string()])
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dev_stack.py starts")
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn the_stack_serves_the_printed_commands_and_stops_everything_on_sigterm() {
    let (grpc_port, moto_port) = (free_port(), free_port());
    let mut stack = dev_stack(grpc_port, moto_port);
    let stdout = stack.stdout.take().unwrap();
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = send.send(line);
        }
    });
    let mut printed = Vec::new();
    while !printed
        .iter()
        .any(|l: &String| l.contains("Ctrl-C stops everything"))
    {
        match lines.recv_timeout(Duration::from_secs(90)) {
            Ok(line) => printed.push(line),
            Err(e) => panic!("the stack did not come up ({e}): {printed:#?}"),
        }
    }

    let forgot = printed
        .iter()
        .find(|l| l.contains("grpcurl") && l.contains("/ForgotPassword"))
        .expect("a ForgotPassword command is printed");
    let answer = Command::new("sh").args(["-c", forgot]).output().unwrap();
    let answer_text = String::from_utf8_lossy(&answer.stdout);
    assert!(answer.status.success(), "{forgot}: {answer:?}");
    assert!(
        answer_text.contains("DELIVERY_MEDIUM_EMAIL"),
        "{answer_text}"
    );
    assert!(
        answer_text.contains(r#""destination": "d***@e***""#),
        "{answer_text}"
    );

    let curl = printed
        .iter()
        .find(|l| l.trim_start().starts_with("curl ") && l.contains("/ForgotPassword"))
        .expect("a curl ForgotPassword command is printed");
    let answer = Command::new("sh").args(["-c", curl]).output().unwrap();
    let answer_text = String::from_utf8_lossy(&answer.stdout);
    assert!(answer.status.success(), "{curl}: {answer:?}");
    let json: serde_json::Value = serde_json::from_str(&answer_text).expect("JSON");
    assert_eq!(
        json["codeDeliveryDetails"]["deliveryMedium"],
        "DELIVERY_MEDIUM_EMAIL"
    );
    assert_eq!(json["codeDeliveryDetails"]["destination"], "d***@e***");

    // The README shows the same commands, for the default port.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for printed_curl in printed
        .iter()
        .filter(|l| l.trim_start().starts_with("curl "))
    {
        let as_documented = printed_curl
            .trim()
            .replace(&format!("localhost:{grpc_port}"), "localhost:50051");
        assert!(
            readme.lines().any(|l| l == as_documented),
            "README.md does not show `{as_documented}`"
        );
    }

    let health = printed
        .iter()
        .find(|l| l.contains("Health/Check"))
        .expect("a health command is printed");
    let answer = Command::new("sh").args(["-c", health]).output().unwrap();
    assert!(String::from_utf8_lossy(&answer.stdout).contains("SERVING"));

    let sent = Command::new("kill")
        .args(["-TERM", &stack.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = stack.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!listening(grpc_port), "the service was left running");
    assert!(!listening(moto_port), "moto was left running");
}

#[test]
fn a_taken_port_is_reported_by_name_and_nothing_is_started() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let grpc_port = taken.local_addr().unwrap().port();
    let moto_port = free_port();

    let output = dev_stack(grpc_port, moto_port).wait_with_output().unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(&format!("port {grpc_port}")), "{stderr}");
    assert!(stderr.contains("GRPC_PORT"), "{stderr}");
    assert!(!listening(moto_port), "moto was started anyway");
}
