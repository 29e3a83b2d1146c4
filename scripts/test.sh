#!/usr/bin/env bash
# Herald's whole test suite. Installs what it needs on a fresh machine, then
# checks formatting and lints and runs every test against real processes.
# Builds once, in the `ci` profile, for the tests and the processes they start.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is required (https://rustup.rs)" >&2
    exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy

# What this installs when missing: Debian packages nats-server and haproxy
# (the cluster tests' real servers), chromium (browser tests), prometheus
# (for promtool), umoci (image checks), nodejs/npm, python3-venv (chart
# checks); from crates.io, cargo-fuzz (the fuzz run); npm packages into
# clients/js; a Python venv in .venv.
echo "Herald's tests install, when missing: nats-server, haproxy, chromium, prometheus (promtool)," >&2
echo "umoci, nodejs/npm, python3-venv (apt, --no-install-recommends); cargo-fuzz; npm packages in" >&2
echo "clients/js; a Python venv in .venv." >&2
missing=()
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v umoci >/dev/null 2>&1 || missing+=(umoci)
command -v node >/dev/null 2>&1 || missing+=(nodejs npm)
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian installs them under /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

export CARGO_TERM_COLOR=never

log "format"
cargo fmt --all -- --check

log "lint"
cargo clippy --workspace --all-targets --profile ci -- -D warnings

log "tests (unit and integration, against real herald processes)"
cargo test --workspace --profile ci

log "browser client: Node tests and real Chromium"
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error && node build.mjs)  # CJS + minified, sizes
HERALD_BIN="$PWD/target/ci/herald" node --test clients/js/test/*.test.js
(cd clients/js && npx tsc -p test/tsconfig.json)  # herald.d.ts against a typed example

log "Helm chart (Helm's library, Kubernetes schemas), promtool, container image"
if [ ! -x .venv/bin/pytest ] || ! .venv/bin/python -c 'import cryptography' 2>/dev/null; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check \
        helm-python-sdk kubernetes-validate pyyaml pytest cryptography
fi
HERALD_BIN="$PWD/target/ci/herald" .venv/bin/pytest -q helm/tests

log "benchmarks compile"
cargo bench --workspace --profile ci --no-run

log "fuzz the protocol parsers (60 s per target)"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
for target in frames requests nats; do
    (cd protocol && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time=60 -print_final_stats=1 2>&1 | tail -3)
done
