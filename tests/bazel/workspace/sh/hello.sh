#!/bin/bash
# Run from the runfiles tree of the workspace (a test's working directory).
set -euo pipefail
echo "hello from sh_binary: $(wc -l < sh/lines.txt | tr -d ' ') lines"
