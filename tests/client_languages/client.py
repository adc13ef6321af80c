"""A Python client of the service over gRPC, switching on the ErrorReason of its errors.

Usage: client.py ADDR OUTDIR, where ADDR is the server's host:port (plaintext) and OUTDIR the
directory generate.sh wrote (its py/ holds the grpcio-tools code). Makes two calls that fail
before any Cognito call, and prints one line per call: the ErrorInfo reason, its ErrorReason
number and the branch of the switch it took. Exits 1 on anything unexpected.

Run by tests/client_languages.rs against the real server; README, "Switching on the reason".
"""

import os
import sys

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

DOMAIN = "password-recovery"


def fail(message):
    print(f"client.py: {message}", file=sys.stderr)
    sys.exit(1)


if len(sys.argv) != 3:
    fail("usage: client.py ADDR OUTDIR")
ADDR, OUTDIR = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(OUTDIR, "py"))

from passwordrecovery.v1 import error_reason_pb2  # noqa: E402 (generated into OUTDIR)
from passwordrecovery.v1 import password_recovery_pb2, password_recovery_pb2_grpc  # noqa: E402

ErrorReason = error_reason_pb2.ErrorReason


def error_info(error):
    """The one ErrorInfo of the service's domain among the status details of `error`."""
    status = rpc_status.from_call(error)
    if status is None:
        fail(f"{error.code().name} without status details: {error.details()}")
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    if len(infos) != 1 or infos[0].domain != DOMAIN:
        fail(f"not exactly one ErrorInfo of {DOMAIN}: {infos}")
    return infos[0]


def reason_of(name):
    """The ErrorReason a reason names; one this code does not know (a newer server's) is
    ERROR_REASON_UNSPECIFIED, handled by the gRPC code alone."""
    try:
        return ErrorReason.Value(name)
    except ValueError:
        return error_reason_pb2.ERROR_REASON_UNSPECIFIED


def branch(reason, code):
    """What a caller does about the error: the switch on the reason."""
    match reason:
        case error_reason_pb2.INVALID_REQUEST:
            return "fix the request"
        case error_reason_pb2.CLIENT_NOT_ALLOWED:
            return "use a client_id the server serves"
        case error_reason_pb2.RATE_LIMITED | error_reason_pb2.OVERLOADED:
            return "retry after RetryInfo"
        case error_reason_pb2.CODE_MISMATCH | error_reason_pb2.EXPIRED_CODE:
            return "ask the user for the code again"
        case _:
            return f"by gRPC code {code.name}"


if reason_of("A_REASON_FROM_A_NEWER_SERVER") != error_reason_pb2.ERROR_REASON_UNSPECIFIED:
    fail("an unknown reason does not map to ERROR_REASON_UNSPECIFIED")

CALLS = [
    # (request, the gRPC code and reason the server must answer)
    (password_recovery_pb2.ForgotPasswordRequest(username=""),
     grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
    # A well-formed client id ([A-Za-z0-9_+]: "not-served" would be INVALID_REQUEST) that
    # the server does not serve.
    (password_recovery_pb2.ForgotPasswordRequest(username="x@example.com", client_id="notserved"),
     grpc.StatusCode.PERMISSION_DENIED, "CLIENT_NOT_ALLOWED"),
]

# A loopback test client: never through a proxy named by the environment.
with grpc.insecure_channel(ADDR, options=[("grpc.enable_http_proxy", 0)]) as channel:
    stub = password_recovery_pb2_grpc.PasswordRecoveryStub(channel)
    for request, want_code, want_reason in CALLS:
        try:
            stub.ForgotPassword(request, timeout=10)
        except grpc.RpcError as error:
            info = error_info(error)
            reason = reason_of(info.reason)
            print(f"{info.reason} {reason} {branch(reason, error.code())}", flush=True)
            if (error.code(), info.reason) != (want_code, want_reason):
                fail(f"expected {want_code.name} {want_reason}, got {error.code().name} {info.reason}")
        else:
            fail(f"ForgotPassword({request}) succeeded")
