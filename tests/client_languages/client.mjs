// A TypeScript-world client of the service over the Connect protocol's JSON door (connect-es
// with connect-node, HTTP/1.1, JSON), switching on the ErrorReason of its errors.
//
// Usage: node client.mjs ADDR OUTDIR, where ADDR is the server's host:port (plaintext) and
// OUTDIR the directory generate.sh wrote (its ts/ holds protoc-gen-es's code, as .js + .d.ts).
// Makes two calls that fail before any Cognito call, and prints one line per call: the
// ErrorInfo reason, its ErrorReason number and the branch of the switch it took. Exits 1 on
// anything unexpected.
//
// Run by tests/client_languages.rs against the real server; README, "Switching on the reason".

import path from "node:path";
import { pathToFileURL } from "node:url";

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";

const DOMAIN = "password-recovery";

function fail(message) {
  console.error(`client.mjs: ${message}`);
  process.exit(1);
}

if (process.argv.length !== 4) {
  fail("usage: node client.mjs ADDR OUTDIR");
}
const [addr, outdir] = process.argv.slice(2);
const generated = pathToFileURL(path.join(path.resolve(outdir), "ts") + path.sep);
const load = (file) => import(new URL(file, generated).href);

const { PasswordRecovery } = await load("passwordrecovery/v1/password_recovery_pb.js");
const { ErrorReason, ErrorReasonSchema } = await load("passwordrecovery/v1/error_reason_pb.js");
const { ErrorInfoSchema } = await load("google/rpc/error_details_pb.js");

/** The ErrorReason a reason names; one this code does not know (a newer server's) is
 * ERROR_REASON_UNSPECIFIED, handled by the gRPC code alone. Looked up by the proto name. */
function reasonOf(name) {
  const value = ErrorReasonSchema.values.find((v) => v.name === name);
  return value === undefined ? ErrorReason.ERROR_REASON_UNSPECIFIED : value.number;
}

/** What a caller does about the error: the switch on the reason. */
function branch(reason, code) {
  switch (reason) {
    case ErrorReason.INVALID_REQUEST:
      return "fix the request";
    case ErrorReason.CLIENT_NOT_ALLOWED:
      return "use a client_id the server serves";
    case ErrorReason.RATE_LIMITED:
    case ErrorReason.OVERLOADED:
      return "retry after RetryInfo";
    case ErrorReason.CODE_MISMATCH:
    case ErrorReason.EXPIRED_CODE:
      return "ask the user for the code again";
    default:
      return `by gRPC code ${Code[code]}`;
  }
}

if (reasonOf("A_REASON_FROM_A_NEWER_SERVER") !== ErrorReason.ERROR_REASON_UNSPECIFIED) {
  fail("an unknown reason does not map to ERROR_REASON_UNSPECIFIED");
}

const transport = createConnectTransport({
  baseUrl: `http://${addr}`,
  httpVersion: "1.1",
  useBinaryFormat: false,
});
const client = createClient(PasswordRecovery, transport);

const calls = [
  // [request, the code and reason the server must answer]
  [{ username: "" }, Code.InvalidArgument, "INVALID_REQUEST"],
  // A well-formed client id ([A-Za-z0-9_+]: "not-served" would be INVALID_REQUEST) that the
  // server does not serve.
  [{ username: "x@example.com", clientId: "notserved" }, Code.PermissionDenied, "CLIENT_NOT_ALLOWED"],
];

for (const [request, wantCode, wantReason] of calls) {
  let error;
  try {
    await client.forgotPassword(request, { timeoutMs: 10_000 });
  } catch (caught) {
    error = ConnectError.from(caught);
  }
  if (error === undefined) {
    fail(`ForgotPassword(${JSON.stringify(request)}) succeeded`);
  }
  const infos = error.findDetails(ErrorInfoSchema);
  if (infos.length !== 1 || infos[0].domain !== DOMAIN) {
    fail(`not exactly one ErrorInfo of ${DOMAIN}: ${error.message} ${JSON.stringify(infos)}`);
  }
  const info = infos[0];
  const reason = reasonOf(info.reason);
  console.log(`${info.reason} ${reason} ${branch(reason, error.code)}`);
  if (error.code !== wantCode || info.reason !== wantReason) {
    fail(`expected ${Code[wantCode]} ${wantReason}, got ${Code[error.code]} ${info.reason}`);
  }
}
