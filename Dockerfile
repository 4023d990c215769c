# The monsoon image: one static-ish binary, /monsoon, on a distroless base (no shell, no package
# manager), running as the distroless `nonroot` user. The same image runs `monsoon operator`
# and the worker pods it creates.
#
#   docker build -t ghcr.io/monsoon-dev/monsoon:0.1.0 .
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts, which keep the
# cargo registry and target/ between builds.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# --locked: build exactly the dependency versions of Cargo.lock. The release link lays the plain
# path's code together (.cargo/config.toml names tools/hot-code/cc.sh as the linker; it needs
# bash, nm and awk, which this image has). target/ lives in a cache
# mount, so the binary is copied out in the same step. Debug info is stripped (the release
# profile keeps it for profiling); symbol names stay, so backtraces still name functions.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release -p monsoon --locked \
 && cp target/release/monsoon /monsoon \
 && strip --strip-debug /monsoon

# glibc, libgcc and CA certificates; nothing else.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /monsoon /monsoon
USER 65532:65532
# /healthz, /readyz, /metrics (`--http-addr`).
EXPOSE 9464
ENTRYPOINT ["/monsoon"]
