# syntax=docker/dockerfile:1
#
# One image with Fleet's three binaries (fleet-orchestrator, fleet-gateway, fleet-robot);
# compose.yaml chooses the command per service. Build: `docker compose build` or
#   docker build -t fleet .
# Run one part: docker run --rm -e NATS_URL=nats://host:4222 fleet fleet-robot --tenant acme

# --- build -------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# Any sqlx query macros are checked against the committed .sqlx/ data, not a live database.
ENV SQLX_OFFLINE=true \
    CARGO_INCREMENTAL=0
COPY . .
# The registry and target directories are cache mounts, so a rebuild after a source change
# recompiles only Fleet's own crates. The cache is not part of the layer: copy the binaries out.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        --bin fleet-orchestrator --bin fleet-gateway --bin fleet-robot \
    && mkdir -p /out \
    && cp target/release/fleet-orchestrator target/release/fleet-gateway target/release/fleet-robot /out/

# --- run ---------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: TLS for `http` steps and remote NATS. python3: robots run shell steps, and
# external runners such as the Canvas graph runner are Python programs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 \
    && rm -rf /var/lib/apt/lists/*
# A fixed uid so volume ownership is predictable. The robot's state directory exists in the
# image owned by that user, so a volume mounted there starts out writable by it.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/fleet fleet \
    && mkdir -p /var/lib/fleet/robot /var/lib/fleet/auth \
    && chown fleet:fleet /var/lib/fleet/robot /var/lib/fleet/auth
COPY --from=builder /out/ /usr/local/bin/
USER fleet
WORKDIR /var/lib/fleet
EXPOSE 8080
CMD ["fleet-gateway", "--listen", "0.0.0.0:8080"]
