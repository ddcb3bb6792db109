# syntax=docker/dockerfile:1
# The messenger image: one static-ish binary (glibc only; SQLite is bundled,
# crypto is ring) on distroless, run as a non-root numeric user. Every role
# runs from it: `messenger serve --service gateway|message|presence|media`,
# `messenger migrate`, `messenger config`.
#
#   docker build -t messenger:dev .
#
# Checked by hadolint (scripts/chart.sh); the Helm chart in helm/messenger
# runs it with a read-only root filesystem.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
# protoc: tonic code generation in proto/build.rs. Bookworm's own version,
# fixed for the release: pinning its Debian revision would break the build
# at the next security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target directory between builds;
# the binary is copied out of the cached target so the next stage sees it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p messenger \
    && install -D -m 0755 target/release/messenger /out/messenger

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="messenger" \
      org.opencontainers.image.description="A Messenger-class chat backend: gRPC services in one binary" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/messenger /usr/local/bin/messenger
# distroless's nonroot user, by number so runAsNonRoot can verify it.
USER 65532:65532
WORKDIR /var/lib/messenger
# gateway public / gateway browser port / gateway internal (Deliver) / message / presence / media / notify
EXPOSE 7700 7780 7701 7710 7720 7730 7740
ENTRYPOINT ["/usr/local/bin/messenger"]
CMD ["--help"]
