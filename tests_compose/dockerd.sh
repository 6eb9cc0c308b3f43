#!/usr/bin/env bash
# Runs a command with Docker's engine: the one running, or a dockerd started here (as root) and
# stopped when the command ends, pass or fail.
set -uo pipefail
started=""
if ! docker info >/dev/null 2>&1; then
  log=$(mktemp /tmp/dockerd.XXXXXX.log)
  dockerd >"$log" 2>&1 &
  started=$!
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start (see $log)" >&2; kill "$started"; exit 1; }
fi
"$@"
status=$?
if [ -n "$started" ]; then
  kill "$started"; wait "$started" 2>/dev/null
fi
exit $status
