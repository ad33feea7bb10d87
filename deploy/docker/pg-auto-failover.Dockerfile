# PostgreSQL with pg_auto_failover, for docker-compose.cluster.yml: the official image (its
# PostgreSQL Global Development Group apt repository is already set up) plus pg_auto_failover from
# that repository, for the same major version as the single-host deployment.
FROM postgres:17-bookworm
# the PGDG packages follow the base image's PostgreSQL minor version: pinning them would fight it
# hadolint ignore=DL3008
RUN apt-get update \
  && apt-get install -y --no-install-recommends postgresql-17-auto-failover pg-auto-failover-cli \
  && rm -rf /var/lib/apt/lists/*
COPY --chmod=0755 deploy/postgres/pg-auto-failover /usr/local/bin/pg-auto-failover
# the image's own postgres user (uid 999), which owns the data directory
USER 999:999
ENTRYPOINT ["/usr/local/bin/pg-auto-failover"]
CMD ["node"]
