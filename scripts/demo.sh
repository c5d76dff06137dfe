#!/usr/bin/env bash
# `make demo`: a real session on a real Docker sandbox, end to end.
# Starts a worker in the background, submits a mock-agent session with a prompt and --wait, prints the
# result JSON and the agent's reply, terminates the session, stops the worker, and checks nothing is left.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=.venv/bin
LOG=$(mktemp -t sandbox-worker-demo.XXXXXX.log)
REQUEST_ID="demo-$(date +%s)-$$"

# An ephemeral Fernet key unless one is configured: the daemon token is stored encrypted.
export SANDBOX_WORKER_FERNET_KEY="${SANDBOX_WORKER_FERNET_KEY:-$($BIN/sandbox-worker keygen)}"

$BIN/sandbox-worker worker --concurrency 1 --providers docker >"$LOG" 2>&1 &
WORKER=$!
stop_worker() {
    kill -TERM "$WORKER" 2>/dev/null && wait "$WORKER" 2>/dev/null || true
}
trap 'stop_worker; echo "worker log: $LOG"' EXIT

for _ in $(seq 1 100); do
    grep -q "ready\." "$LOG" && break
    kill -0 "$WORKER" 2>/dev/null || { cat "$LOG"; echo "the worker exited" >&2; exit 1; }
    sleep 0.2
done

echo "== submitting $REQUEST_ID (agent mock, provider docker)"
START=$(date +%s.%N)
RESULT=$($BIN/sandbox-worker submit --agent mock --provider docker --tenant demo --request-id "$REQUEST_ID" \
    --prompt "Hello from make demo" --wait --json)
END=$(date +%s.%N)
echo "$RESULT"
echo "== agent reply: $(printf '%s' "$RESULT" | $BIN/python -c 'import json,sys; print(json.load(sys.stdin)["reply"])')"
printf '== ready in %.2fs (submit to ready, through the queue)\n' "$(echo "$END - $START" | bc 2>/dev/null || $BIN/python -c "print($END-$START)")"

echo "== terminating"
$BIN/sandbox-worker terminate "$REQUEST_ID"
LEFT=$(docker ps -aq --filter "label=sandbox-worker-request-id=$REQUEST_ID" | wc -l)
echo "== containers left for $REQUEST_ID: $LEFT"
[[ "$LEFT" == 0 ]]
