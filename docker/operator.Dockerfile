# resultity-operator. Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/resultity/resultity-operator:0.1.0 .
#
# Runtime base: distroless "cc" (glibc for aws-lc, CA certificates, no shell, uid 65532).
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p resultity-operator --bin resultity-operator \
 && install -D -m 0755 target/release/resultity-operator /out/resultity-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/resultity-operator /resultity-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/resultity-operator"]
CMD ["run"]
