# syntax=docker/dockerfile:1
#
# Duet's DAP interoperation test images (draft-dcook-ppm-dap-interop-test-design-07): one image
# per role, chosen at build time.
#
#   docker build --build-arg ROLE=client     -t duet-interop-client .
#   docker build --build-arg ROLE=aggregator -t duet-interop-aggregator .   # Leader and Helper
#   docker build --build-arg ROLE=collector  -t duet-interop-collector .
#
# A container serves the role's /internal/test/* API on port 8080 (the aggregator also serves DAP
# there, at the root, for the tasks it is Leader or Helper of), needs no arguments, environment or
# volumes, and writes its log to /logs as well as to standard error. The test API provisions tasks
# without authentication: these images are for test networks only.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
# SQLite is bundled and the TLS backend builds aws-lc from C: a C toolchain and CMake suffice.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake make perl pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p duet \
    && install -m 0755 target/release/duet /usr/local/bin/duet

FROM debian:${DEBIAN_RELEASE}-slim
ARG ROLE=aggregator
RUN case "${ROLE}" in \
        client|aggregator|collector) ;; \
        *) echo "ROLE must be client, aggregator or collector, not '${ROLE}'" >&2; exit 1 ;; \
    esac
# tini is PID 1 and passes the runner's SIGTERM to the whole process group, so Duet shuts down
# gracefully and the log pipe drains.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /logs
COPY --from=builder /usr/local/bin/duet /usr/local/bin/duet
COPY --chmod=0755 <<'EOF' /usr/local/bin/duet-interop
#!/bin/sh
# Serves one interop role on port 8080; the log goes to standard error and /logs.
set -eu
mkdir -p /logs
duet interop "${DUET_INTEROP_ROLE}" --listen 0.0.0.0:8080 "$@" 2>&1 \
    | tee -a "/logs/duet-${DUET_INTEROP_ROLE}.log" >&2
EOF
ENV DUET_INTEROP_ROLE=${ROLE} \
    RUST_LOG=info \
    NO_COLOR=1
EXPOSE 8080
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/usr/local/bin/duet-interop"]
