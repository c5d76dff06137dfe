#!/usr/bin/env bash
# `make demo`: a real agent session on a real Docker sandbox, end to end.
#
#   AGENT=claude (default) | codex | opencode | mock
#
# Starts the demo's own stand-in LLM API (tests/standins/llm_api.py, on the Docker bridge address) and a worker
# in the background, submits a session whose prompt makes the agent run one tool (the stand-in's `tool`
# scenario: write file.txt in the session's cwd), prints what the agent did (reply, tool calls, stop reason,
# the file read back from the sandbox), terminates the session, stops both, and checks nothing is left.
# The LLM is a stand-in, NOT the real Anthropic/OpenAI API: see README.md ("The demo against a real LLM API").
#
# Knobs: DEMO_LLM_HOST (default: the Docker bridge gateway, 172.17.0.1), DEMO_LLM_PORT (default: a free port),
# BIN (default .venv/bin).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT=$PWD
BIN=${BIN:-.venv/bin}
PY=$BIN/python
# This checkout's code, whatever the venv's editable install points at.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
CLI=("$BIN/sandbox-worker")
AGENT=${AGENT:-claude}
case "$AGENT" in
    claude | opencode) LLM=anthropic LLM_NAME=Anthropic ;;
    codex) LLM=openai LLM_NAME=OpenAI ;;
    mock) LLM= ;;
    *) echo "AGENT must be claude, codex, opencode or mock (got '$AGENT')" >&2; exit 2 ;;
esac
LOG=$(mktemp -t sandbox-worker-demo.XXXXXX.log)
LLM_LOG=$(mktemp -t sandbox-worker-demo-llm.XXXXXX.log)
REQUEST_ID="demo-$AGENT-$(date +%s)-$$"
TENANT=demo
CWD=/workspace   # the session's cwd (the request's default)
TOOL_FILE=file.txt

# Single-tenant dev mode: this script is the only sender, so tasks are not signed (docs/operations.md, "Trust
# model"); a fleet serving web apps keeps the default, signed.
export SANDBOX_WORKER_AUTH__MODE=open

# An ephemeral Fernet key unless one is configured: the daemon token is stored encrypted.
export SANDBOX_WORKER_FERNET_KEY="${SANDBOX_WORKER_FERNET_KEY:-$("${CLI[@]}" keygen)}"

WORKER= STANDIN= TERMINATED=0
cleanup() {
    if [[ "$TERMINATED" == 0 && -n "$WORKER" ]]; then
        "${CLI[@]}" terminate "$REQUEST_ID" >/dev/null 2>&1 || true
    fi
    [[ -n "$WORKER" ]] && { kill -TERM "$WORKER" 2>/dev/null && wait "$WORKER" 2>/dev/null || true; }
    [[ -n "$STANDIN" ]] && { kill -TERM "$STANDIN" 2>/dev/null && wait "$STANDIN" 2>/dev/null || true; }
    echo "worker log: $LOG${LLM:+   stand-in LLM log: $LLM_LOG}"
}
trap cleanup EXIT

SUBMIT_ARGS=(--agent "$AGENT" --provider docker --tenant "$TENANT" --request-id "$REQUEST_ID")
# Wait until LOG has a line matching PATTERN, failing if the process PID (NAME) exits first.
wait_for_line() {
    local pattern=$1 log=$2 pid=$3 name=$4
    for _ in $(seq 1 100); do
        grep -q "$pattern" "$log" && return 0
        kill -0 "$pid" 2>/dev/null || { cat "$log"; echo "$name exited" >&2; exit 1; }
        sleep 0.2
    done
}

if [[ -n "$LLM" ]]; then
    # The demo's stand-in LLM API, reachable from the sandbox only on the bridge address (never 0.0.0.0).
    HOST=${DEMO_LLM_HOST:-$(docker network inspect bridge --format '{{(index .IPAM.Config 0).Gateway}}' 2>/dev/null || true)}
    HOST=${HOST:-172.17.0.1}
    PORT=${DEMO_LLM_PORT:-$("$PY" -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$HOST")}
    LLM_URL="http://$HOST:$PORT"
    DEMO_KEY="sk-demo-not-a-real-key-$$"   # made up; the stand-in accepts only this one
    "$PY" -m tests.standins.llm_api --host "$HOST" --port "$PORT" --accepted-key "$DEMO_KEY" >"$LLM_LOG" 2>&1 &
    STANDIN=$!
    wait_for_line "stand-in LLM API on" "$LLM_LOG" "$STANDIN" "the stand-in LLM API"
    echo "== LLM: stand-in $LLM_NAME API at $LLM_URL (tests/standins/llm_api.py), not the real API"
    # The `shared` strategy: an org key (the made-up demo key) for the demo tenant, at the stand-in's address.
    export SANDBOX_WORKER_CREDENTIALS__SHARED__ANTHROPIC="$DEMO_KEY"
    export SANDBOX_WORKER_CREDENTIALS__SHARED__OPENAI="$DEMO_KEY"
    export SANDBOX_WORKER_CREDENTIALS__SHARED__TENANTS="[\"$TENANT\"]"
    export SANDBOX_WORKER_CREDENTIALS__PROVIDER_URLS__ANTHROPIC="$LLM_URL"
    export SANDBOX_WORKER_CREDENTIALS__PROVIDER_URLS__OPENAI="$LLM_URL/v1"
    # Sandboxes reach no host port the operator has not allowed (docs/operations.md, Sandbox network isolation).
    export SANDBOX_WORKER_DOCKER__ALLOWED_HOST_PORTS="[$PORT]"
    SUBMIT_ARGS+=(--strategy shared --prompt "Write hi to $TOOL_FILE with a shell command. [scenario:tool]")
else
    echo "== LLM: none (the mock agent answers by itself)"
    SUBMIT_ARGS+=(--prompt "Hello from make demo")
fi

"${CLI[@]}" worker --concurrency 1 --providers docker >"$LOG" 2>&1 &
WORKER=$!
wait_for_line "ready\." "$LOG" "$WORKER" "the worker"

echo "== submitting $REQUEST_ID (agent $AGENT, provider docker${LLM:+, strategy shared})"
START=$(date +%s.%N)
STATUS=0
RESULT=$("${CLI[@]}" submit "${SUBMIT_ARGS[@]}" --wait --json) || STATUS=$?
END=$(date +%s.%N)
if [[ "$STATUS" != 0 ]]; then
    echo "$RESULT"
    echo "== the session did not come up (exit $STATUS); last worker log lines:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
fi
# What the agent did, from the SessionResult.
RESULT="$RESULT" "$PY" - <<'PY'
import json, os
r = json.loads(os.environ["RESULT"])
print(f"== session {r['session_id']} ready in sandbox {r['sandbox_id'][:12]} (agent {r['agent']})")
print(f"   reply:       {r['reply']!r}")
print(f"   tool calls:  {r['tool_calls'] or 'none'}")
print(f"   stop reason: {r['stop_reason']}")
if r.get("usage"):
    print(f"   usage:       {r['usage']}")
print("   stages (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in r["timings_ms"].items()))
PY
printf '== ready in %.2fs (submit to ready, through the queue)\n' "$("$PY" -c "print($END - $START)")"
SANDBOX_ID=$(printf '%s' "$RESULT" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["sandbox_id"])')

if [[ -n "$LLM" ]]; then
    echo "== $CWD/$TOOL_FILE in the sandbox (docker exec): $(docker exec "$SANDBOX_ID" cat "$CWD/$TOOL_FILE" 2>&1 || true)"
    # What reached the stand-in (never the key itself).
    "$PY" - "$LLM_URL" <<'PY'
import json, sys, urllib.request
requests = json.load(urllib.request.urlopen(f"{sys.argv[1]}/_standin/requests", timeout=5))
calls = [r for r in requests if r["path"] in ("/v1/messages", "/v1/responses")]
summary = ", ".join(
    f"{r['method']} {r['path']} {r['status']}" + (" +tool_result" if r["tool_result"] else "") for r in calls
)
print(f"== the stand-in LLM API answered {len(calls)} model call(s) ({len(requests)} requests in all): {summary}")
PY
fi

echo "== terminating"
"${CLI[@]}" terminate "$REQUEST_ID" --json | "$PY" -c 'import json,sys; r=json.load(sys.stdin); print("   state:", r["state"])'
TERMINATED=1
LEFT=$(docker ps -aq --filter "label=sandbox-worker-request-id=$REQUEST_ID" | wc -l)
echo "== containers left for $REQUEST_ID: $LEFT"
[[ "$LEFT" == 0 ]]
