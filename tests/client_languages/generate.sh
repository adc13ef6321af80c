#!/usr/bin/env bash
# Generates the TypeScript (protoc-gen-es, through buf) and Python (grpcio-tools' protoc)
# code of the service's proto into OUTDIR, with the project-local tools only:
#   OUTDIR/ts/  passwordrecovery/v1/*_pb.js (+ .d.ts) and google/rpc/error_details_pb.js
#   OUTDIR/py/  passwordrecovery/v1/*_pb2.py and *_pb2_grpc.py
# google.rpc.ErrorInfo comes from the error_details.proto that googleapis-common-protos ships
# (the Python runtime of the same types). OUTDIR/node_modules links to the project's, so the
# generated modules find @bufbuild/protobuf wherever OUTDIR is.
# Usage: tests/client_languages/generate.sh OUTDIR   (needs `npm ci` and the .venv of `make`)
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 64
fi
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
mkdir -p "$1"
out="$(cd "$1" && pwd)"

buf="$root/node_modules/.bin/buf"
es="$root/node_modules/.bin/protoc-gen-es"
python="$root/.venv/bin/python"
for tool in "$buf" "$es"; do
    [ -x "$tool" ] || { echo "$tool is missing: run \`npm ci\` in $root (make test does it)" >&2; exit 1; }
done
[ -x "$python" ] || { echo "$python is missing: run \`make .venv/.installed\` (make test does it)" >&2; exit 1; }
"$python" -c 'import grpc_tools.protoc' 2>/dev/null \
    || { echo "grpcio-tools is missing: run \`$root/.venv/bin/pip install -r $root/requirements-dev.txt\` (make test does it)" >&2; exit 1; }
googleapis="$("$python" -c 'import google.rpc, os; print(os.path.dirname(os.path.dirname(google.rpc.__path__[0])))')" \
    || { echo "googleapis-common-protos is missing: run \`$root/.venv/bin/pip install -r $root/requirements-dev.txt\` (make test does it)" >&2; exit 1; }
[ -f "$googleapis/google/rpc/error_details.proto" ] \
    || { echo "no google/rpc/error_details.proto under $googleapis (googleapis-common-protos)" >&2; exit 1; }

# TypeScript: buf compiles the repo's module (buf.yaml, path proto) and runs protoc-gen-es.
export PATH="$root/node_modules/.bin:$PATH"
(cd "$root" && "$buf" generate --template "$here/buf.gen.yaml" --output "$out")
# ErrorInfo: only error_details.proto, copied into a module of its own (its import of
# google/protobuf/duration.proto is a well-known type that buf and @bufbuild/protobuf have).
rm -rf "$out/googleapis"
mkdir -p "$out/googleapis/google/rpc"
cp "$googleapis/google/rpc/error_details.proto" "$out/googleapis/google/rpc/"
"$buf" generate "$out/googleapis" --template "$here/buf.gen.yaml" --output "$out"
ln -sfn "$root/node_modules" "$out/node_modules"

# Python: grpcio-tools' bundled protoc with its protoc-gen-grpc_python. ErrorInfo and the
# rpc Status come from googleapis-common-protos at run time.
mkdir -p "$out/py"
(cd "$root/proto" && "$python" -m grpc_tools.protoc -I . \
    --python_out="$out/py" --grpc_python_out="$out/py" \
    passwordrecovery/v1/password_recovery.proto passwordrecovery/v1/error_reason.proto)
