# Herald's container image: a multi-stage build to a small, non-root image.
#
#   docker build -t herald:0.1.0 .        (or: buildah bud -t herald:0.1.0 .)
#
# The Helm chart's default image is `herald:<appVersion>`. Without a container
# engine, scripts/build-image.sh assembles the same image with umoci from a
# release binary and the libraries it links (the test suite does this).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p herald-broker && strip target/release/herald

# distroless/cc: glibc and libgcc, no shell, nonroot user 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/herald /usr/local/bin/herald
USER 65532:65532
EXPOSE 8080
ENV HERALD_LISTEN=0.0.0.0:8080
ENTRYPOINT ["/usr/local/bin/herald"]
CMD ["serve"]
