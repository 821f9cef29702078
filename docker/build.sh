#!/usr/bin/env bash
# Build ExpBuild's images on the local Docker engine from Debian's packages alone: no
# registry is contacted. mmdebstrap makes a minimal Debian root file system from the
# machine's own apt sources, `docker import` turns it into the base image, and every
# other image is a `docker build` on that base whose packages come from the same mirror.
#
#   docker/build.sh            build what is missing or out of date: each image is tagged
#                              with a hash of the files it is made from, and kept while
#                              that tag exists
#   docker/build.sh --force    rebuild everything
#
# Images: expbuild-debian:<suite> (base), expbuild:latest (server + worker + CLI, from the
# wheel, with bubblewrap for the sandbox backend), expbuild-postgres:15, expbuild-haproxy,
# expbuild-prometheus. Environment: SUITE (default: this machine's Debian release),
# IMAGE_PYTHON (that release's python3, default 3.11), PYTHON (a Python with pip, to fetch
# the wheels), MIRROR / SECURITY_MIRROR (default: read from /etc/apt/sources.list*).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
force=0
[ "${1:-}" = "--force" ] && force=1

SUITE="${SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}"
BASE="expbuild-debian:$SUITE"
IMAGE_PYTHON="${IMAGE_PYTHON:-3.11}"  # Debian bookworm's python3
PYTHON="${PYTHON:-python3}"
export DOCKER_BUILDKIT=0  # the classic builder: works with Debian's engine, no buildx needed

# The Debian archive and security URIs the machine's apt already uses (deb822 `URIs:`
# lines or one-line `deb URI SUITE …` entries).
apt_uris() {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null |
        sed -n -e 's/^URIs:[[:space:]]*//p' \
            -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p' |
        tr ' ' '\n' | grep -v '^$' || true
}
MIRROR="${MIRROR:-$(apt_uris | grep -v security | head -n1)}"
SECURITY_MIRROR="${SECURITY_MIRROR:-$(apt_uris | grep security | head -n1)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

have() { [ "$force" = 0 ] && docker image inspect "$1" >/dev/null 2>&1; }

size() { docker image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'; }

quiet_builder() {  # the classic builder's deprecation notice and pip's index notes
    grep -v -e '^DEPRECATED: The legacy builder' -e '^ *BuildKit is currently disabled' \
        -e '^ *environment-variable' -e "^WARNING: Location 'file:" -e '^$' >&2 || true
}

# A short hash of the files an image is made from (paths relative to the repository).
content_hash() {
    (cd "$repo" && find "$@" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 |
        sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-12
}

# ensure NAME SOURCE… -- BUILDER ARG…: unless NAME:<hash of the sources> exists, run
# BUILDER ARG… TAG; then tag it NAME as well, and report its size and build time.
ensure() {
    local name="$1" sources=() started=$SECONDS
    shift
    while [ "$1" != "--" ]; do
        sources+=("$1")
        shift
    done
    shift
    local keyed
    keyed="${name%%:*}:src-$(content_hash "${sources[@]}")"
    if have "$keyed"; then
        echo "build.sh: $name exists, kept ($keyed, $(size "$keyed"))"
    else
        echo "build.sh: building $name"
        "$@" "$keyed" 2> >(quiet_builder)
        echo "build.sh: built $name in $((SECONDS - started))s ($keyed, $(size "$keyed"))"
    fi
    docker tag "$keyed" "$name"
}

debian_base() {
    local sources=("deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main")
    [ -n "$SECURITY_MIRROR" ] && sources+=("deb $SECURITY_MIRROR $SUITE-security main")
    # minbase: essential packages and apt only; docs and locales are left out of the image.
    mmdebstrap --quiet --variant=minbase --include=ca-certificates \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        "$SUITE" - "${sources[@]}" |
        docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$1" >/dev/null
}

from_dir() {  # from_dir DIR TAG: a docker build of one of the small images
    docker build --quiet --network host --build-arg "BASE=$BASE" -t "$2" "$1" >/dev/null
}

expbuild_image() {
    # The wheel and every dependency as wheels for the image's Python (Debian's), fetched
    # here: the build itself reaches no package index.
    local context
    context="$(mktemp -d)"
    cp "$here/Dockerfile" "$context/"
    "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$context/wheels" "$repo"
    "$PYTHON" -m pip download --quiet --dest "$context/wheels" --only-binary=:all: \
        --python-version "$IMAGE_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform linux_x86_64 \
        "$context"/wheels/expbuild-*.whl
    docker build --quiet --network host --build-arg "BASE=$BASE" -t "$1" "$context" >/dev/null
    rm -rf "$context"
}

command -v docker >/dev/null || { echo "build.sh: no docker CLI (apt-get install docker.io)" >&2; exit 1; }
total=$SECONDS
# The base is keyed by the release: its packages come from the mirror, not from this tree.
if have "$BASE"; then
    echo "build.sh: $BASE exists, kept ($(size "$BASE"))"
else
    command -v mmdebstrap >/dev/null || { echo "build.sh: apt-get install mmdebstrap" >&2; exit 1; }
    echo "build.sh: building $BASE"
    debian_base "$BASE"
    echo "build.sh: built $BASE in $((SECONDS - total))s ($(size "$BASE"))"
fi
ensure expbuild-postgres:15 docker/postgres -- from_dir "$here/postgres"
ensure expbuild-haproxy:latest docker/haproxy/Dockerfile -- from_dir "$here/haproxy"
ensure expbuild-prometheus:latest docker/prometheus/Dockerfile -- from_dir "$here/prometheus"
ensure expbuild:latest expbuild migrations pyproject.toml docker/Dockerfile -- expbuild_image
echo "build.sh: images ready in $((SECONDS - total))s"
