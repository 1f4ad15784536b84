#!/usr/bin/env bash
# Build the project's Dockerfile without a container daemon, then run the built image's
# entrypoint from its root file system, infer once and run its HEALTHCHECK.
#
#   deploy/image/build.sh [WORKDIR]      (as root; needs buildah and debootstrap)
#
# 1. Base image: a Debian root file system bootstrapped by debootstrap from the Debian mirror
#    this machine's apt uses (DEBIAN_MIRROR overrides), with Python 3.11 and venv, imported
#    with `FROM scratch` + ADD: no registry pull. It is passed as the BASE_IMAGE build argument.
# 2. The Dockerfile, built by `buildah bud --isolation chroot` (no daemon, no user namespaces).
#    torch comes from the package source this machine's pip installs from: its find-links
#    folder is mounted into the build and passed as PIP_FIND_LINKS, or TORCH_INDEX_URL is
#    forwarded when set; no host is written here.
# 3. `buildah run` starts the image's ENTRYPOINT (as its USER, with its ENV) on loopback,
#    this script infers through the V2 API and runs the image's HEALTHCHECK command inside
#    the container, then stops the server with SIGTERM and checks it exits 0.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${1:-$(mktemp -d /tmp/gated-image.XXXXXX)}"
SUITE="${DEBIAN_SUITE:-bookworm}"
TAG="${IMAGE_TAG:-localhost/gated-serve:ci}"
PORT="${IMAGE_TEST_PORT:-18080}"
export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}" BUILDAH_ISOLATION=chroot
mkdir -p "$WORK"
step() { printf '\n== %s (%ds)\n' "$*" "$SECONDS"; }

mirror="${DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
    mirror="$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -v security | head -1 || true)"
fi
if [ -z "$mirror" ]; then
    mirror="$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list \
        2>/dev/null || true)"
fi
[ -n "$mirror" ] || { echo "no Debian mirror found in apt's sources; set DEBIAN_MIRROR" >&2; exit 2; }

step "bootstrap $SUITE from $mirror"
rootfs="$WORK/rootfs"
if [ ! -x "$rootfs/usr/bin/python3" ]; then
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$rootfs" "$mirror" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
fi
"$rootfs/usr/bin/python3" --version 2>/dev/null || chroot "$rootfs" python3 --version

step "base image"
tar -C "$rootfs" -cf "$WORK/rootfs.tar" .
printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n' > "$WORK/Containerfile.base"
buildah bud --quiet --isolation chroot --format docker -f "$WORK/Containerfile.base" \
    -t localhost/gated-base:"$SUITE" "$WORK" > /dev/null

step "image from the Dockerfile"
args=(--isolation chroot --format docker --layers=false -t "$TAG"
      --build-arg BASE_IMAGE=localhost/gated-base:"$SUITE")
links="${PIP_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}"
if [ -n "$links" ] && [ -d "$links" ]; then
    args+=(-v "$links:$links:ro" --build-arg PIP_FIND_LINKS="$links")
fi
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    args+=(--build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL")
fi
index="${PIP_INDEX_URL:-$(pip config get global.index-url 2>/dev/null || true)}"
if [ -n "$index" ]; then
    args+=(--build-arg PIP_INDEX_URL="$index")
fi
buildah bud "${args[@]}" "$ROOT" 2>&1 | grep -v '^ *$' | tail -25

step "run the entrypoint"
buildah rm gated-image-test > /dev/null 2>&1 || true
buildah from --name gated-image-test "$TAG" > /dev/null
buildah inspect --format '{{json .Docker.Config.Entrypoint}} user={{.Docker.Config.User}}' \
    gated-image-test
log="$WORK/serve.log"
buildah run --isolation chroot --env GATED_PORT="$PORT" --env GATED_GRPC_PORT=0 \
    --env GATED_HOST=127.0.0.1 gated-image-test -- gated serve > "$log" 2>&1 &
server=$!
cleanup() { kill "$server" 2>/dev/null || true; buildah rm gated-image-test > /dev/null 2>&1 || true; }
trap cleanup EXIT
for _ in $(seq 1 240); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/v2/health/ready', timeout=1)" 2>/dev/null; then
        break
    fi
    kill -0 "$server" 2>/dev/null || { cat "$log" >&2; echo "server exited" >&2; exit 1; }
    sleep 0.5
done

step "infer"
python3 - "$PORT" <<'PY'
import json, sys, urllib.request
port = sys.argv[1]
body = {"inputs": [{"name": "input", "shape": [1, 40], "datatype": "FP32", "data": [0.1] * 40}],
        "parameters": {"gate_mode": "dynamic", "keep_ratio": 0.5}}
req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/mnist1d-conv/infer",
                             json.dumps(body).encode(), {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=10))
logits = reply["outputs"][0]
assert logits["name"] == "logits" and logits["shape"] == [1, 10], reply
print("infer: 10 logits, flops_ratio", reply["parameters"]["flops_ratio"])
PY

step "HEALTHCHECK"
check="$(buildah inspect --format '{{json .Docker.Config.Healthcheck.Test}}' gated-image-test)"
echo "HEALTHCHECK $check"
mapfile -t cmd < <(python3 -c "import json,sys; t=json.loads(sys.argv[1]); assert t[0]=='CMD', t; print('\n'.join(t[1:]))" "$check")
buildah run --isolation chroot --env GATED_PORT="$PORT" gated-image-test -- "${cmd[@]}"
echo "healthcheck: exit 0"

step "SIGTERM"
pkill -TERM -f "/opt/venv/bin/gated serve" || true
wait "$server" && code=0 || code=$?
trap - EXIT
buildah rm gated-image-test > /dev/null
grep -E "ready:|stopped" "$log" | sed 's/^/  server: /'
[ "$code" -eq 0 ] || { tail -20 "$log" >&2; echo "server exit code $code" >&2; exit 1; }
step "image $TAG: built, served, healthy, stopped cleanly"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep gated || true
