# syntax=docker/dockerfile:1
# Cairn's node image: cairnd (the daemon), cairn (the operator CLI, also the
# DaemonSet's readiness probe) and cairn-csi (the CSI node plugin).
#
#   docker build -t cairn:dev .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The caches keep the crate downloads and compiled dependencies between
# builds; the binaries are copied out because the target cache is not part of
# the image. protoc comes from the protoc-bin-vendored crate, so the build
# needs nothing from apt.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p cairn-daemon -p cairn-csi \
    && mkdir -p /out \
    && cp target/release/cairnd target/release/cairn target/release/cairn-csi /out/

FROM debian:bookworm-slim
# ca-certificates: TLS to the object stores. util-linux and mount: the mount
# tools the CSI plugin relies on to inspect and undo mounts.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates mount util-linux \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# Root, on purpose. cairn-csi bind-mounts volumes into the kubelet's pod
# directories, which needs CAP_SYS_ADMIN in the host's mount namespace (the
# DaemonSet runs it privileged). cairnd owns the host directories of the
# memory and disk tiers and its socket, which the kubelet creates as root; the
# DaemonSet drops all of its capabilities but the two it needs.
CMD ["cairnd"]
