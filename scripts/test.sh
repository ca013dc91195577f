#!/usr/bin/env bash
# Fresh-machine setup + the whole test suite. The README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

# System tools some tests use (tmux for the real-terminal test, sshd + iproute2 for the
# two-host namespace test, bubblewrap for run_shell's sandbox, OpenBLAS for fast float32
# matmuls in MLX on Linux). Best effort: the tests that need them skip with a reason when they are missing.
if [ "$(uname)" = "Linux" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  need=()
  command -v tmux >/dev/null || need+=(tmux)
  command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || need+=(openssh-server openssh-client)
  command -v ip >/dev/null || need+=(iproute2)
  command -v bwrap >/dev/null || need+=(bubblewrap)  # run_shell's sandbox (tests/tui/test_sandbox.py)
  [ -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ] || [ "$(uname -m)" != "x86_64" ] || need+=(libopenblas0-pthread)
  if [ ${#need[@]} -gt 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null 2>&1 \
      || echo "note: could not apt-get install ${need[*]}; tests needing them will skip"
  fi
fi

python -m pip install -q -e ".[test]"
exec python -m pytest -q -p no:cacheprovider "$@"
