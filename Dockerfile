# syntax=docker/dockerfile:1

# ---- build -------------------------------------------------------------
FROM rust:1-slim-bookworm AS builder

# OpenSSL is pinned to the 3.0 series that the runtime image ships (libssl3).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libssl-dev=3.0.* \
        pkg-config=1.8.* \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Dependencies first: this layer is rebuilt only when a manifest or
# Cargo.lock changes. cargo reads every workspace member's manifest and
# wants every target a manifest declares to exist, so each gets a stub: the
# root package's library, its two binaries and its integration test, and
# the load generator's binary (a member of its own, never built here).
COPY Cargo.toml Cargo.lock ./
COPY cmd/vulcan-stream-bench/Cargo.toml cmd/vulcan-stream-bench/
RUN mkdir -p src cmd/vulcan-stream cmd/vulcan-stream-test-client \
        cmd/vulcan-stream-bench/src tests/integration \
    && touch src/lib.rs tests/integration/main.rs \
    && for main in cmd/vulcan-stream/main.rs cmd/vulcan-stream-test-client/main.rs \
        cmd/vulcan-stream-bench/src/main.rs; do echo 'fn main() {}' > "$main"; done \
    && cargo build --release --locked -p vulcan-stream --bins

# The real sources of the root package; the load generator keeps its stub.
# COPY keeps their modification times, which may be older than the stubs',
# so touch them for cargo to notice the change.
COPY src ./src
# The durable mode's schema, which `vulcan-stream migrate` embeds.
COPY _resources/sql ./_resources/sql
COPY cmd/vulcan-stream ./cmd/vulcan-stream
COPY cmd/vulcan-stream-test-client ./cmd/vulcan-stream-test-client
RUN find src cmd/vulcan-stream cmd/vulcan-stream-test-client -name '*.rs' -exec touch {} + \
    && cargo build --release --locked -p vulcan-stream --bins

# ---- runtime -----------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: any release (its versions are dates and the trust roots
# must stay current); libssl3: the 3.0 series the binaries were built with.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates=20* \
        libssl3=3.0.* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 vulcan \
    && useradd --system --uid 10001 --gid vulcan --no-create-home \
        --home-dir /app --shell /usr/sbin/nologin vulcan

WORKDIR /app

COPY --from=builder /build/target/release/vulcan-stream /build/target/release/vulcan-stream-test-client /usr/local/bin/
COPY config.toml /app/config.toml

# No HEALTHCHECK: the image has no HTTP client. Orchestrators can probe
# GET /ready (200 while LISTEN is active) and GET /status on port 8080.
EXPOSE 8080

USER 10001:10001

# Settings come from /app/config.toml and the environment
# (docker run --env-file ./local.env IMAGE); mount another file over
# /app/config.toml, or pass a path as the argument, to replace it.
ENTRYPOINT ["vulcan-stream"]
CMD ["/app/config.toml"]
