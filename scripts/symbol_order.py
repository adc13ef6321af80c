#!/usr/bin/env python3
"""Writes link/symbol-order.txt: the functions of the shipped binary that run when it starts and
serves, for the linker to lay out side by side (`--symbol-ordering-file`, see build.rs), and sets
the Dockerfile's RUST_VERSION to the rustc that built the binary, whose names they are.

The binary runs under valgrind's callgrind in front of moto (the stack of `make run`) from exec
to exit: start-up and the first proofs of the app client, then every kind of call through both
doors (reflection, health, ForgotPassword and ConfirmForgotPassword accepted, refused by Cognito
and refused as malformed, gRPC and Connect JSON, one at a time and 16 at once), a metrics scrape,
and the graceful stop on SIGTERM. Then it runs under callgrind again through the hostile loads
of tests/memory.rs (`PASSWORD_RECOVERY_PROFILE_DIR`). Every function callgrind saw run in the
binary is listed, by its mangled name, sorted so that regenerating after a small change is a
small diff.

The names carry the hashes rustc gives them, which change with the toolchain, the dependencies'
versions and their features: regenerate after any of those changes (`make symbol-order`), as the
test `the_shipped_binary_keeps_the_code_it_runs_side_by_side` asks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dev_stack import (
    CREDENTIAL_VARIABLES,
    DEMO_USER,
    ROOT,
    StackError,
    create_demo_pool,
    find_tool,
    service_env,
    start,
    stop,
    wait_for_port,
)

SERVICE = "passwordrecovery.v1.PasswordRecovery"
HEADER = """\
# The functions password-recovery runs from start-up through its calls, and the memory tests'
# hostile loads, to its exit, for the linker to place side by side (lld's
# --symbol-ordering-file, passed by build.rs). Written by `make symbol-order`
# (scripts/symbol_order.py) from the shipped build: do not edit. The names
# are the ones this toolchain gives (the Dockerfile's RUST_VERSION is held to it):
# rustc {version}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def grpcurl(tool: str, port: int, method: str, body: dict | None = None) -> None:
    """One gRPC call; a refusal is an answer too, only a hang or a crash is not."""
    command = [tool, "-plaintext", "-max-time", "60"]
    if body is not None:
        command += ["-d", json.dumps(body)]
    command += [f"127.0.0.1:{port}", *method.split()]
    subprocess.run(command, capture_output=True, timeout=120, check=False)


def connect(port: int, method: str, body: bytes) -> None:
    """One Connect JSON call over HTTP/1.1."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/{SERVICE}/{method}",
        data=body,
        headers={"content-type": "application/json"},
    )
    try:
        urllib.request.urlopen(request, timeout=60).read()
    except urllib.error.HTTPError as refused:
        refused.read()


def exercise(tool: str, port: int, metrics_port: int) -> None:
    grpcurl(tool, port, "list")
    grpcurl(tool, port, f"describe {SERVICE}")
    grpcurl(tool, port, "grpc.health.v1.Health/Check", {"service": SERVICE})
    forgot = {"username": DEMO_USER}
    confirm = {"username": DEMO_USER, "confirmation_code": "123456", "password": "N3w-Passw0rd!"}
    for body in (
        forgot,
        {"username": "nobody@example.com"},
        {"username": ""},
    ):
        grpcurl(tool, port, f"{SERVICE}/ForgotPassword", body)
    for body in (
        confirm,
        {**confirm, "confirmation_code": "moto-confirmation-code:0"},
        {**confirm, "confirmation_code": "x"},
    ):
        grpcurl(tool, port, f"{SERVICE}/ConfirmForgotPassword", body)
    connect(port, "ForgotPassword", json.dumps(forgot).encode())
    connect(port, "ConfirmForgotPassword", json.dumps(
        {"username": DEMO_USER, "confirmationCode": "123456", "password": "N3w-Passw0rd!"}
    ).encode())
    connect(port, "ForgotPassword", b"{not json")
    # Each its own user, so that the per-user limit lets them reach Cognito.
    users = [{"username": f"user{n}@example.com"} for n in range(32)]
    with ThreadPoolExecutor(16) as pool:
        calls = [pool.submit(grpcurl, tool, port, f"{SERVICE}/ForgotPassword", body)
                 for body in users[:16]]
        calls += [pool.submit(connect, port, "ForgotPassword", json.dumps(body).encode())
                  for body in users[16:]]
        for call in calls:
            call.result()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=60)
    answered = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.read().decode().splitlines()
        if line.startswith("grpc_server_handled_total{") and 'grpc_code="OK"' in line
    )
    if answered < 16:
        raise StackError(f"only {answered:.0f} calls were answered OK: the run missed Cognito")


def executed_functions(profile: Path, binary: Path) -> set[str]:
    """The names of the functions of `binary` that have a cost in a callgrind profile."""
    objects: dict[str, str] = {}
    names: dict[str, str] = {}
    functions: set[str] = set()
    current_object = None
    # Names are compressed: `ob=(3) /path` the first time, `ob=(3)` after; `c`-prefixed lines
    # name a call's target and do not move the current function.
    line_pattern = re.compile(r"^(c?)(ob|fn)=\((\d+)\)(?: (.*))?$")
    with open(profile, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            match = line_pattern.match(line.rstrip("\n"))
            if not match:
                continue
            is_call, kind, number, name = match.groups()
            table = objects if kind == "ob" else names
            if name:
                table[number] = name
            if is_call:
                continue
            if kind == "ob":
                current_object = os.path.realpath(objects[number])
            elif current_object == str(binary):
                functions.add(names[number])
    return functions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--binary", required=True, help="the shipped (release) binary")
    parser.add_argument("--out", default=str(ROOT / "link" / "symbol-order.txt"))
    args = parser.parse_args()
    binary = Path(args.binary).resolve()

    moto_server = find_tool("moto_server")
    tool = find_tool("grpcurl")
    valgrind = find_tool("valgrind")
    moto = service = None
    work = None
    try:
        if moto_server is None or tool is None:
            raise StackError("moto_server and grpcurl are needed: make tools")
        if valgrind is None:
            raise StackError("valgrind is needed: apt-get install valgrind")
        if not binary.exists():
            raise StackError(f"{binary} not found: cargo build --release --locked")
        work = Path(tempfile.mkdtemp(prefix="symbol-order-"))
        moto_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
        moto_url = f"http://127.0.0.1:{moto_port}"
        moto = start(
            [moto_server, "-H", "127.0.0.1", "-p", str(moto_port)],
            {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARIABLES},
            work / "moto.log",
        )
        wait_for_port(moto_port, moto, "moto_server", work / "moto.log", 60)
        pool = create_demo_pool(moto_url)
        env = service_env(pool, moto_url, grpc_port, metrics_port)
        env["LOG_FORMAT"] = "json"
        profile = work / "callgrind.out"
        service = start(
            [valgrind, "--tool=callgrind", "--demangle=no", "--dump-instr=no",
             f"--callgrind-out-file={profile}", str(binary)],
            env,
            work / "password-recovery.log",
        )
        wait_for_port(grpc_port, service, "password-recovery under callgrind",
                      work / "password-recovery.log", 300)
        exercise(tool, grpc_port, metrics_port)
        service.send_signal(signal.SIGTERM)
        if service.wait(300) != 0:
            raise StackError(f"password-recovery exited with {service.returncode}; see {work}")
        # Only names the binary defines: callgrind also names code it found no symbol for.
        defined = set(subprocess.run(
            ["nm", "--defined-only", "--format=just-symbols", str(binary)],
            capture_output=True, text=True, check=True,
        ).stdout.split())
        functions = executed_functions(profile, binary)
        # The memory tests' hostile shapes run code no honest call does (streams taken back,
        # bodies cut off, connections over the cap); what it maps at runtime would stay
        # resident after the load. Under valgrind the tests' bounds and timings fail: only
        # the profiles they leave are wanted.
        loads = work / "memory-tests"
        loads.mkdir()
        with open(work / "memory-tests.log", "wb") as log:
            tests = subprocess.Popen(
                ["cargo", "test", "--locked", "--test", "memory", "--", "--test-threads=1"],
                cwd=ROOT,
                env={**os.environ, "PASSWORD_RECOVERY_PROFILE_DIR": str(loads),
                     "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            try:
                tests.wait(1800)
            finally:
                # The test binary and the valgrinds it started go with cargo.
                if tests.poll() is None:
                    os.killpg(tests.pid, signal.SIGKILL)
                    tests.wait()
        loaded = set()
        for dump in sorted(loads.iterdir()):
            loaded |= executed_functions(dump, binary)
        if not (loaded & defined) - functions:
            raise StackError("the memory tests' loads ran nothing start-up and calls did not "
                             f"(did they reach the release binary?); see {work}")
        functions = (functions | loaded) & defined
        if len(functions) < 1000:
            raise StackError(f"only {len(functions)} functions seen in {binary}; see {work}")
        comment = subprocess.run(
            ["readelf", "--string-dump=.comment", str(binary)],
            capture_output=True, text=True, check=True,
        ).stdout
        version = re.search(r"rustc version (\S+)", comment)
        if version is None:
            raise StackError(f"{binary} does not say which rustc built it")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        listed = "".join(f"{name}\n" for name in sorted(functions))
        Path(args.out).write_text(HEADER.format(version=version.group(1)) + listed)
        # The image builds with the rustc the names are of.
        dockerfile = ROOT / "Dockerfile"
        dockerfile.write_text(re.sub(r"(?m)^ARG RUST_VERSION=.*$",
                                     f"ARG RUST_VERSION={version.group(1)}",
                                     dockerfile.read_text()))
        print(f"{args.out}: {len(functions)} functions, for rustc {version.group(1)}")
        shutil.rmtree(work)
        return 0
    except StackError as err:
        print(f"make symbol-order: {err}", file=sys.stderr, flush=True)
        return 1
    except (OSError, subprocess.SubprocessError, urllib.error.URLError) as err:
        print(f"make symbol-order: {err}; see {work}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop(service, 60)
        stop(moto, 10)


if __name__ == "__main__":
    sys.exit(main())
