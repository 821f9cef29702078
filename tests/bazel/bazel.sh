#!/bin/bash
# Run Debian's Bazel 4.2.3 on tests/bazel/workspace offline: `tests/bazel/bazel.sh build //...`.
# Adds the repository overrides for the stand-ins in tests/bazel/local_repos and keeps Bazel's
# output under ${EXPBUILD_BAZEL_ROOT:-/tmp/expbuild-bazel}, not ~/.cache.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command="${1:?usage: bazel.sh COMMAND [ARGS...]}"
shift
flags=()
case "$command" in
    build | test | run | info | query | cquery | aquery | fetch | coverage)
        for repo in rules_cc rules_java remote_coverage_tools; do
            flags+=("--override_repository=${repo}=${here}/local_repos/${repo}")
        done
        ;;
esac
cd "$here/workspace"
exec "${BAZEL:-bazel}" --nohome_rc --output_user_root="${EXPBUILD_BAZEL_ROOT:-/tmp/expbuild-bazel}" \
    "$command" "${flags[@]}" "$@"
