"""The container image, built offline with umoci from the herald binary and
the libraries it links (scripts/build-image.sh): small, non-root, and its
binary runs inside the image's own root filesystem."""

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERALD = os.environ.get("HERALD_BIN", os.path.join(ROOT, "target", "ci", "herald"))


def test_image_builds_and_runs(tmp_path):
    layout = tmp_path / "oci"
    subprocess.run([os.path.join(ROOT, "scripts", "build-image.sh"), HERALD, str(layout), "0.1.0"], check=True)
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:0.1.0", str(bundle)], check=True,
                   stdout=subprocess.DEVNULL)
    with open(bundle / "config.json") as f:
        spec = json.load(f)
    assert spec["process"]["user"]["uid"] == 65532
    assert spec["process"]["args"] == ["/usr/local/bin/herald", "serve"]
    assert "HERALD_LISTEN=0.0.0.0:8080" in spec["process"]["env"]
    rootfs = bundle / "rootfs"
    # Nothing but the binary, its loader and libraries, and passwd/group.
    files = [os.path.join(d, f) for d, _, fs in os.walk(rootfs) for f in fs]
    assert len(files) < 12, files
    size = sum(os.path.getsize(p) for p in files)
    assert size < 64 * 2**20, size
    out = subprocess.run(["chroot", "--userspec=65532:65532", str(rootfs), "/usr/local/bin/herald", "--version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("herald ")
