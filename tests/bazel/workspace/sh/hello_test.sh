#!/bin/bash
set -euo pipefail
out="$(sh/hello)"
if [ "$out" != "hello from sh_binary: 3 lines" ]; then
    echo "unexpected output from sh/hello: $out" >&2
    exit 1
fi
echo "undeclared output" > "${TEST_UNDECLARED_OUTPUTS_DIR}/extra.txt"
echo "expbuild-conformance: sh_test passed"
