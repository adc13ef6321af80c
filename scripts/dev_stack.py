#!/usr/bin/env python3
"""The local stack behind `make run`: a Cognito emulator (moto) with a demo user pool, and
password-recovery in front of it on localhost, until Ctrl-C or SIGTERM stops both.

Only the set-up step that creates the pool talks to moto with dummy credentials; the service
itself runs with no AWS credentials at all, exactly as in production.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3

REGION = "us-east-1"
DEMO_USER = "demo@example.com"
DEMO_PASSWORD = "Demo-Passw0rd!"
ROOT = Path(__file__).resolve().parent.parent
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)


class StackError(Exception):
    """A step failed; the message says which and what to do."""


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent dies (no orphans)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def find_tool(name: str) -> str | None:
    """`name` from this Python's virtualenv (`.venv/bin`), else from PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


def check_port_free(port: int, setting: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(
                f"port {port} on localhost is taken (another `make run`?); "
                f"stop what holds it or choose another with {setting}=PORT"
            ) from None


def wait_for_port(port: int, process: subprocess.Popen, what: str, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{what} exited with code {process.returncode}; see {log}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise StackError(f"{what} did not listen on port {port} within {seconds:.0f}s; see {log}")


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )


def create_demo_pool(endpoint: str) -> dict[str, str]:
    """A pool with email recovery, an app client with a secret, and a confirmed demo user."""
    cognito = boto3.client(
        "cognito-idp",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="moto-set-up-only",
        aws_secret_access_key="moto-set-up-only",
    )
    pool_id = cognito.create_user_pool(
        PoolName="password-recovery-demo",
        AutoVerifiedAttributes=["email"],
        AccountRecoverySetting={"RecoveryMechanisms": [{"Name": "verified_email", "Priority": 1}]},
    )["UserPool"]["Id"]
    client = cognito.create_user_pool_client(
        UserPoolId=pool_id,
        ClientName="password-recovery-demo",
        GenerateSecret=True,
        ExplicitAuthFlows=["ALLOW_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"],
    )["UserPoolClient"]
    cognito.admin_create_user(
        UserPoolId=pool_id,
        Username=DEMO_USER,
        UserAttributes=[
            {"Name": "email", "Value": DEMO_USER},
            {"Name": "email_verified", "Value": "true"},
        ],
        MessageAction="SUPPRESS",
    )
    cognito.admin_set_user_password(
        UserPoolId=pool_id, Username=DEMO_USER, Password=DEMO_PASSWORD, Permanent=True
    )
    return {
        "pool_id": pool_id,
        "client_id": client["ClientId"],
        "client_secret": client["ClientSecret"],
    }


def service_env(
    pool: dict[str, str], moto_url: str, grpc_port: int, metrics_port: int
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARIABLES}
    env.update(
        {
            "COGNITO_CLIENT_ID": pool["client_id"],
            "COGNITO_CLIENT_SECRET": pool["client_secret"],
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": moto_url,
            "AWS_EC2_METADATA_DISABLED": "true",
            "GRPC_LISTEN_ADDR": f"127.0.0.1:{grpc_port}",
            "METRICS_LISTEN_ADDR": f"127.0.0.1:{metrics_port}",
            "LOG_FORMAT": env.get("LOG_FORMAT", "text"),
        }
    )
    return env


def instructions(grpcurl: str, grpc_port: int, moto_url: str, pool: dict[str, str]) -> str:
    target = f"localhost:{grpc_port}"
    service = "passwordrecovery.v1.PasswordRecovery"
    return f"""
password-recovery is serving on {target}, in front of moto (Cognito emulator) at {moto_url}
  user pool {pool['pool_id']}, app client {pool['client_id']} (with a secret)
  demo user {DEMO_USER}, password {DEMO_PASSWORD}

Try it:
  {grpcurl} -plaintext {target} list
  {grpcurl} -plaintext {target} describe {service}
  {grpcurl} -plaintext -d '{{"service":"{service}"}}' {target} grpc.health.v1.Health/Check
  {grpcurl} -plaintext -d '{{"username":"{DEMO_USER}"}}' {target} {service}/ForgotPassword
  {grpcurl} -plaintext -d '{{"username":"{DEMO_USER}","confirmation_code":"123456","password":"N3w-Passw0rd!"}}' {target} {service}/ConfirmForgotPassword

Or as JSON over HTTP (the Connect protocol), with curl:
  curl --header 'content-type: application/json' --data '{{"username":"{DEMO_USER}"}}' http://{target}/{service}/ForgotPassword
  curl --header 'content-type: application/json' --data '{{"username":"{DEMO_USER}","confirmationCode":"123456","password":"N3w-Passw0rd!"}}' http://{target}/{service}/ConfirmForgotPassword

(moto accepts any confirmation code that does not start with "moto-confirmation-code:")
Ctrl-C stops everything.
"""


def stop(process: subprocess.Popen | None, seconds: float) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--binary", required=True, help="the password-recovery binary")
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("GRPC_PORT", "50051")))
    parser.add_argument("--moto-port", type=int, default=int(os.environ.get("MOTO_PORT", "5055")))
    parser.add_argument(
        "--metrics-port", type=int, default=int(os.environ.get("METRICS_PORT", "9090"))
    )
    args = parser.parse_args()

    die_with_parent()
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    moto_server = find_tool("moto_server")
    grpcurl = find_tool("grpcurl") or "grpcurl"
    logs = ROOT / "target" / "dev-stack"
    moto = service = None
    try:
        if moto_server is None:
            raise StackError("moto_server not found: pip install 'moto[server,cognitoidp]'")
        if not Path(args.binary).exists():
            raise StackError(f"{args.binary} not found: run `cargo build` first")
        check_port_free(args.moto_port, "MOTO_PORT")
        check_port_free(args.grpc_port, "GRPC_PORT")
        check_port_free(args.metrics_port, "METRICS_PORT")

        moto_url = f"http://127.0.0.1:{args.moto_port}"
        print(f"starting moto on {moto_url} (log: {logs / 'moto.log'})", flush=True)
        moto = start(
            [moto_server, "-H", "127.0.0.1", "-p", str(args.moto_port)],
            {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARIABLES},
            logs / "moto.log",
        )
        wait_for_port(args.moto_port, moto, "moto_server", logs / "moto.log", 60)

        try:
            pool = create_demo_pool(moto_url)
        except Exception as err:  # boto3 raises many types; all mean the set-up failed
            raise StackError(f"creating the demo user pool in moto failed: {err}") from err

        print(f"starting password-recovery on localhost:{args.grpc_port} "
              f"(log: {logs / 'password-recovery.log'})", flush=True)
        service = start(
            [args.binary],
            service_env(pool, moto_url, args.grpc_port, args.metrics_port),
            logs / "password-recovery.log",
        )
        wait_for_port(args.grpc_port, service, "password-recovery",
                      logs / "password-recovery.log", 60)
        print(instructions(grpcurl, args.grpc_port, moto_url, pool), flush=True)
        print(f"Metrics: curl http://localhost:{args.metrics_port}/metrics\n", flush=True)

        while not stopping:
            for name, process in (("moto_server", moto), ("password-recovery", service)):
                if process.poll() is not None:
                    raise StackError(f"{name} exited with code {process.returncode}; see {logs}")
            time.sleep(0.2)
        print("stopping password-recovery and moto", flush=True)
        return 0
    except StackError as err:
        print(f"make run: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop(service, 25)
        stop(moto, 10)


if __name__ == "__main__":
    sys.exit(main())
