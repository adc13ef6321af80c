# syntax=docker/dockerfile:1
# password-recovery: build with cargo-chef so dependencies are a cached layer of their own,
# run on distroless cc (Debian 12, the builder's release, so glibc matches) as a numeric
# non-root user, with no shell and no compilers.

# The exact release link/symbol-order.txt was written for: rustc's symbol names change with
# every release, and the linker lays out only the functions the file still names.
ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
# make builds jemalloc (tikv-jemalloc-sys runs its configure and make).
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Dependencies only: this layer is rebuilt when Cargo.toml or Cargo.lock change, not the code.
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin password-recovery

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="password-recovery" \
      org.opencontainers.image.description="gRPC service for Cognito password resets (ForgotPassword / ConfirmForgotPassword)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=builder /src/target/release/password-recovery /usr/local/bin/password-recovery
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# gRPC, plaintext health (with TLS on), Prometheus metrics.
EXPOSE 50051 8081 9090
ENTRYPOINT ["/usr/local/bin/password-recovery"]
