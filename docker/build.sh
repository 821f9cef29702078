#!/usr/bin/env bash
# Build ExpBuild's images on the local Docker engine from Debian's packages alone: no
# registry is contacted. mmdebstrap makes a minimal Debian root file system from the
# machine's own apt sources, `docker import` turns it into the base image, and every
# other image is a `docker build` on that base whose packages come from the same mirror.
#
#   docker/build.sh            build what is missing (an image that exists is kept)
#   docker/build.sh --force    rebuild everything
#
# Images: expbuild-debian:<suite> (base), expbuild:latest (server + worker + CLI, from the
# wheel, with bubblewrap for the sandbox backend), expbuild-postgres:15, expbuild-haproxy,
# expbuild-prometheus. Environment: SUITE (default: this machine's Debian release),
# IMAGE_PYTHON (that release's python3, default 3.11), MIRROR / SECURITY_MIRROR (default:
# read from /etc/apt/sources.list*).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
force=0
[ "${1:-}" = "--force" ] && force=1

SUITE="${SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}"
BASE="expbuild-debian:$SUITE"
IMAGE_PYTHON="${IMAGE_PYTHON:-3.11}"  # Debian bookworm's python3
export DOCKER_BUILDKIT=0  # the classic builder: works with Debian's engine, no buildx needed

# The first Debian archive and security URIs the machine's apt already uses (deb822
# `URIs:` lines or one-line `deb URI SUITE …` entries).
apt_uris() {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null |
        sed -n -e 's/^URIs:[[:space:]]*//p' -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p' |
        tr ' ' '\n' | grep -v '^$' || true
}
MIRROR="${MIRROR:-$(apt_uris | grep -v security | head -n1)}"
SECURITY_MIRROR="${SECURITY_MIRROR:-$(apt_uris | grep security | head -n1)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

have() { [ "$force" = 0 ] && docker image inspect "$1" >/dev/null 2>&1; }

timed() {  # timed NAME COMMAND…: run, then report the image's size and the wall time
    local name="$1" started=$SECONDS
    shift
    if have "$name"; then
        echo "build.sh: $name exists, kept ($(size "$name"))"
        return
    fi
    echo "build.sh: building $name"
    "$@" 2> >(grep -v -e '^DEPRECATED: The legacy builder' -e '^ *BuildKit is currently disabled' \
        -e '^ *environment-variable' -e "^WARNING: Location 'file:" -e '^$' >&2)
    echo "build.sh: built $name in $((SECONDS - started))s ($(size "$name"))"
}

size() { docker image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'; }

base() {
    local sources=("deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main")
    [ -n "$SECURITY_MIRROR" ] && sources+=("deb $SECURITY_MIRROR $SUITE-security main")
    # minbase: essential packages and apt only; docs and locales are left out of the image.
    mmdebstrap --quiet --variant=minbase --include=ca-certificates \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        "$SUITE" - "${sources[@]}" |
        docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$BASE" >/dev/null
}

expbuild_image() {
    # The wheel and every dependency as wheels for the image's Python (Debian's), fetched
    # here: the build itself reaches no package index.
    local context
    context="$(mktemp -d)"
    cp "$here/Dockerfile" "$context/"
    python3 -m pip wheel --quiet --no-deps --wheel-dir "$context/wheels" "$repo"
    python3 -m pip download --quiet --dest "$context/wheels" --only-binary=:all: \
        --python-version "$IMAGE_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform linux_x86_64 \
        "$context"/wheels/expbuild-*.whl
    docker build --quiet --network host --build-arg "BASE=$BASE" -t expbuild:latest "$context" >/dev/null
    rm -rf "$context"
}

from_dir() {  # from_dir NAME DIR: a docker build of one of the small images
    docker build --quiet --network host --build-arg "BASE=$BASE" -t "$1" "$2" >/dev/null
}

command -v docker >/dev/null || { echo "build.sh: no docker CLI (apt-get install docker.io)" >&2; exit 1; }
if ! have "$BASE"; then
    command -v mmdebstrap >/dev/null || { echo "build.sh: apt-get install mmdebstrap" >&2; exit 1; }
fi
total=$SECONDS
timed "$BASE" base
timed expbuild-postgres:15 from_dir expbuild-postgres:15 "$here/postgres"
timed expbuild-haproxy:latest from_dir expbuild-haproxy:latest "$here/haproxy"
timed expbuild-prometheus:latest from_dir expbuild-prometheus:latest "$here/prometheus"
timed expbuild:latest expbuild_image
echo "build.sh: images ready in $((SECONDS - total))s"
