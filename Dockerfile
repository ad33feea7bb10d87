# syntax=docker/dockerfile:1
# One image with Sensorhub's five binaries (ingest-http, ingest-mqtt, persister, query-api, sensorctl);
# deploy/docker-compose.yml picks the one each container runs with its `command`.
#
#   docker build -t sensorhub .                          (or: docker compose -f deploy/docker-compose.yml build)
#   docker buildx build --platform linux/arm64 -t ... .  (a Raspberry Pi image, built on a bigger machine)

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
# diesel links libpq
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpq-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The workspace's own dependency features are already trimmed (no TLS stacks, no compression: TLS is
# Traefik's job). The caches keep the registry and the build between builds of this image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      -p ingest-http -p ingest-mqtt -p persister -p query-api -p sensorctl \
 && mkdir -p /out \
 && for bin in ingest-http ingest-mqtt persister query-api sensorctl; do cp "target/release/$bin" /out/; done

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# libpq5: diesel; ca-certificates: TLS to a managed PostgreSQL or RabbitMQ; curl: the compose health
# checks; openssl: the one-off job that makes Mosquitto's internal certificate.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpq5 ca-certificates curl openssl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sensorhub
COPY --from=builder /out/ /usr/local/bin/
COPY deploy/docker/replica-client-id /usr/local/bin/replica-client-id
USER 10001:10001
ENV LOG_FORMAT=json
# ingest-http, query-api, persister's and ingest-mqtt's ops ports (as set in docker-compose.yml)
EXPOSE 8080 8081 8082 8083
CMD ["sensorctl", "--help"]
