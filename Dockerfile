# syntax=docker/dockerfile:1
# A static (musl) release binary on distroless-static, running as non-root. The same `make static`
# runs in the test suite, which proves the binary builds and is static without a Docker engine.
FROM docker.io/library/rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN make static

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/authprobe /usr/local/bin/authprobe
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/authprobe"]
CMD ["run"]
