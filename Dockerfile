# portal in a container.
#
#   docker build -t portal .
#   docker run --rm -p 7000:7000 -v "$PWD/deploy:/etc/portal:ro" portal
#
# /etc/portal/portal.yaml is the configuration (relative paths in it resolve
# against /etc/portal, so certs can sit beside it). Inside a container an
# endpoint must listen on 0.0.0.0:PORT to be reachable through -p; the admin
# listener can stay on its default 127.0.0.1:9090, which is where the
# HEALTHCHECK below looks.

FROM rust:1-bookworm AS build
# No protoc needed: etcd's gRPC bindings are committed Rust (src/etcd_api).
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The repository's release profile keeps debug info for profiling; the image
# does not need it (a smaller binary, a faster build).
ENV CARGO_PROFILE_RELEASE_DEBUG=0
RUN cargo build --release --locked

FROM debian:bookworm-slim
# curl only for the HEALTHCHECK.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
# A fixed uid, so mounted key files can be made readable to it (chown 10001).
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin portal
COPY --from=build /src/target/release/portal /usr/local/bin/portal
USER portal
# 7000: the example's Redis endpoint; 9090: admin (/metrics, /status, /health, /ready).
EXPOSE 7000 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9090/health || exit 1
# SIGTERM (docker stop) drains sessions for shutdown.drain_timeout, then exits 0.
ENTRYPOINT ["portal"]
CMD ["run", "-c", "/etc/portal/portal.yaml"]
