# resultity-sidecar: the node agent beside every GPU runtime, also `resultity-sidecar doctor`
# (the `helm test` preflight). Build from the repository root:
#   docker build -f docker/sidecar.Dockerfile -t ghcr.io/resultity/resultity-sidecar:0.1.0 .
#
# Runtime base: distroless "cc" (glibc, CA certificates, no shell), because NVML is loaded at
# run time from the libnvidia-ml.so the NVIDIA container toolkit injects, which needs glibc;
# a static musl binary could not dlopen it.
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p resultity-sidecar --bin resultity-sidecar \
 && install -D -m 0755 target/release/resultity-sidecar /out/resultity-sidecar

FROM gcr.io/distroless/cc-debian12:nonroot
# The operator's preStop hook runs `/resultity-sidecar drain`: keep the binary at this path.
COPY --from=build /out/resultity-sidecar /resultity-sidecar
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/resultity-sidecar"]
CMD ["--help"]
