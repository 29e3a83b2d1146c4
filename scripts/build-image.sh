#!/usr/bin/env bash
# Builds Herald's OCI image without a container engine or network: from
# scratch, with the given herald binary and exactly the shared libraries it
# links, a nonroot user, and the same entrypoint as the Dockerfile.
#
#   scripts/build-image.sh target/release/herald out/herald-oci 0.1.0
#
# The result is an OCI image layout (`skopeo copy oci:out/herald-oci:0.1.0
# docker-daemon:herald:0.1.0`, or push it to a registry, to use it).
set -euo pipefail
bin=${1:?herald binary}
layout=${2:?output OCI layout directory}
tag=${3:-0.1.0}
command -v umoci >/dev/null || { echo "umoci is required (apt-get install umoci)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/bundle/rootfs

rm -rf "$layout"
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci unpack --image "$layout:$tag" "$work/bundle" >/dev/null

install -D -m 0755 "$bin" "$rootfs/usr/local/bin/herald"
# The dynamic loader and every library the binary needs, at the same paths.
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    install -D -m 0755 "$lib" "$rootfs$lib"
done
install -d -m 1777 "$rootfs/tmp"
install -d -m 0755 "$rootfs/etc"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$rootfs/etc/group"

umoci repack --image "$layout:$tag" "$work/bundle"
umoci config --image "$layout:$tag" \
    --config.user 65532:65532 \
    --config.entrypoint /usr/local/bin/herald \
    --config.cmd serve \
    --config.exposedports 8080/tcp \
    --config.env HERALD_LISTEN=0.0.0.0:8080 \
    --config.label org.opencontainers.image.title=herald \
    --config.label "org.opencontainers.image.version=$tag"
umoci gc --layout "$layout"
echo "built $layout:$tag"
