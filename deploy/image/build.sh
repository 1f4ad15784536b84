#!/usr/bin/env bash
# Build the project's Dockerfile without a container daemon, then run the built image's
# entrypoint from its root file system, infer once and run its HEALTHCHECK.
#
#   deploy/image/build.sh [WORKDIR]      (as root; needs buildah and debootstrap)
#
# WORKDIR keeps the bootstrapped root file system between runs; IMAGE_REUSE=1 skips the build
# when the image exists (to rerun the checks).
#
# 1. Base image: a Debian root file system bootstrapped by debootstrap from the Debian mirror
#    this machine's apt uses (DEBIAN_MIRROR overrides), with Python 3.11 and venv, imported
#    with `FROM scratch` + ADD: no registry pull. It is passed as the BASE_IMAGE build argument.
# 2. The Dockerfile, built by `buildah bud --isolation chroot` (no daemon, no user namespaces).
#    torch comes from the package sources this machine's pip installs from: its find-links,
#    extra indexes (as TORCH_INDEX_URL; or TORCH_INDEX_URL when set), index and certificate
#    authority are passed as build arguments, local ones mounted read-only; no host is
#    written here.
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
if [ "${IMAGE_REUSE:-0}" = 1 ] && buildah inspect --type image "$TAG" > /dev/null 2>&1; then
    echo "IMAGE_REUSE=1: $TAG exists, not rebuilt"
else
args=(--isolation chroot --format docker --layers=false -t "$TAG"
      --build-arg BASE_IMAGE=localhost/gated-base:"$SUITE")
# This machine's pip configuration (environment first, then pip's files): where its wheels
# come from and which certificate authority it trusts. Local folders and files are mounted
# read-only into the build at the same path.
pip_setting() {  # $1: environment variable, $2: pip config key
    local value="${!1:-}"
    [ -n "$value" ] || value="$(python3 -m pip config get "global.$2" 2>/dev/null || true)"
    printf '%s' "$value"
}
mount_local() {  # every local path named in $1: plain paths, and file:// indexes with
    local item path  # their parent folder (an index's links may point beside it)
    for item in $1; do
        path="${item#file://}"
        if [ "$path" != "$item" ]; then path="$(dirname "${path%/}")"; fi
        if [ -e "$path" ]; then args+=(-v "$path:$path:ro"); fi
    done
}
links="$(pip_setting PIP_FIND_LINKS find-links)"
extra="$(pip_setting PIP_EXTRA_INDEX_URL extra-index-url)"
index="$(pip_setting PIP_INDEX_URL index-url)"
cert="$(pip_setting PIP_CERT cert)"
if [ -n "$links" ]; then args+=(--build-arg PIP_FIND_LINKS="$links"); mount_local "$links"; fi
# TORCH_INDEX_URL becomes the build's extra index: this machine's extra indexes, if any.
torch_index="${TORCH_INDEX_URL:-$extra}"
if [ -n "$torch_index" ]; then
    args+=(--build-arg TORCH_INDEX_URL="$torch_index"); mount_local "$torch_index"
fi
if [ -n "$index" ]; then args+=(--build-arg PIP_INDEX_URL="$index"); mount_local "$index"; fi
if [ -n "$cert" ]; then args+=(--build-arg PIP_CERT="$cert"); mount_local "$cert"; fi
echo "pip sources: find-links=${links:-none} extra-index=${torch_index:-none} index=${index:-PyPI} cert=${cert:-default}"
buildah bud "${args[@]}" "$ROOT" 2>&1 | grep -v '^ *$' | tail -25
fi

step "run the entrypoint"
buildah rm gated-image-test > /dev/null 2>&1 || true
buildah from --name gated-image-test "$TAG" > /dev/null
buildah inspect gated-image-test > "$WORK/inspect.json"
config() {  # a field of the image's configuration, as JSON
    python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))["Docker"]["config"].get(sys.argv[2])))' \
        "$WORK/inspect.json" "$1"
}
echo "ENTRYPOINT $(config Entrypoint)  USER $(config User)"
mapfile -t entrypoint < <(config Entrypoint | python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)))')
uid="$(buildah run --isolation chroot gated-image-test -- python -c 'import os; print(os.getuid())')"
echo "runs as uid $uid"
[ "$uid" != 0 ] || { echo "the image runs as root" >&2; exit 1; }
log="$WORK/serve.log"
# The image's own environment, but loopback and a free port: this is a test host.
buildah run --isolation chroot --env GATED_PORT="$PORT" --env GATED_GRPC_PORT=0 \
    --env GATED_HOST=127.0.0.1 gated-image-test -- "${entrypoint[@]}" > "$log" 2>&1 &
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
check="$(config Healthcheck)"
echo "HEALTHCHECK $check"
mapfile -t cmd < <(python3 -c 'import json, sys; t = json.loads(sys.argv[1])["Test"]; assert t[0] == "CMD", t; print("\n".join(t[1:]))' "$check")
buildah run --isolation chroot --env GATED_PORT="$PORT" gated-image-test -- "${cmd[@]}"
echo "healthcheck: exit 0"

step "SIGTERM"
# The server itself (not buildah-chroot-exec, whose command line names it too).
pkill -TERM -f "^/opt/venv/bin/python /opt/venv/bin/gated serve" || true
wait "$server" && code=0 || code=$?
trap - EXIT
buildah rm gated-image-test > /dev/null
grep -E "ready:|stopped" "$log" | sed 's/^/  server: /'
[ "$code" -eq 0 ] || { tail -20 "$log" >&2; echo "server exit code $code" >&2; exit 1; }
step "image $TAG: built, served, healthy, stopped cleanly"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep gated || true
buildah rmi --prune > /dev/null 2>&1 || true  # earlier builds' untagged images
