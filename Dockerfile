# portal in a container.
#
#   docker build -t portal .
#   mkdir -p deploy/certs && sudo chown 10001 deploy/certs
#   docker run --rm -v "$PWD/deploy/certs:/certs" portal certs init --dir /certs --host localhost
#   docker run --rm -p 127.0.0.1:7000:7000 -v "$PWD/deploy:/etc/portal:ro" portal
#
# /etc/portal/portal.yaml is the configuration (deploy/portal.yaml is an
# example; relative paths in it resolve against /etc/portal, so certs can sit
# beside it). Inside a container an endpoint must listen on 0.0.0.0:PORT to
# be reachable through -p; the admin listener can stay on its default
# 127.0.0.1:9090, which is where the HEALTHCHECK below looks.
#
# Built and run with podman on the project's machine by tests/container.sh.

# The two bases, overridable: tests/container.sh builds this same file with
# bases made locally (--build-arg BUILDER_IMAGE=... RUNTIME_IMAGE=...).
ARG BUILDER_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILDER_IMAGE} AS build
# No protoc needed: etcd's gRPC bindings are committed Rust (src/etcd_api).
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The repository's release profile keeps debug info for profiling; the image
# does not need it (a smaller binary, a faster build). PROTOC points nowhere,
# as in tests/run.sh: a dependency that wants protoc again fails the build.
ENV CARGO_PROFILE_RELEASE_DEBUG=0 \
    PROTOC=/nonexistent/protoc
RUN cargo build --release --locked

FROM ${RUNTIME_IMAGE}
# curl only for the HEALTHCHECK.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
# A fixed uid and gid, so mounted key files can be made readable to it
# (chown 10001); numeric in USER, so that Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 portal \
    && useradd --system --uid 10001 --gid portal --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin portal
COPY --from=build /src/target/release/portal /usr/local/bin/portal
USER 10001:10001
# 7000: the example's Redis endpoint; 9090: admin (/metrics, /status, /health, /ready).
EXPOSE 7000 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9090/health || exit 1
# SIGTERM (docker stop) drains sessions for shutdown.drain_timeout, then exits 0.
ENTRYPOINT ["portal"]
CMD ["run", "-c", "/etc/portal/portal.yaml"]
