#!/usr/bin/env bash
# The baseline: what a person does by hand for the work one cold mock session is, timed by itself.
#
#   bench/baseline.sh IMAGE
#
# docker run the sandbox image, start the daemon in it (the flags and environment of worker/daemon.py
# start_daemon), wait for /v1/health with curl, then over the daemon's ACP-over-HTTP API: initialize (naming the
# agent), open the SSE stream, session/new, session/prompt "hi", and read the reply's text from the stream. That
# is the work Pipeline.create does for a mock session, without the queue, the records, the limits or the checks.
# Then the container is removed (not timed). Prints one JSON line: {"ms": <docker run .. reply>, "reply": ...}.
set -euo pipefail
IMAGE=${1:?usage: bench/baseline.sh IMAGE}
TOKEN=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
AUTH="Authorization: Bearer $TOKEN"
EVENTS=$(mktemp -t sw-baseline-sse.XXXXXX)
CID= SSE=
cleanup() {
    [[ -n "$SSE" ]] && kill "$SSE" 2>/dev/null || true
    [[ -n "$CID" ]] && docker rm -f "$CID" >/dev/null 2>&1 || true
    rm -f "$EVENTS"
}
trap cleanup EXIT
now_ms() { echo $(($(date +%s%N) / 1000000)); }
post() {  # post JSON-BODY [QUERY]: one ACP envelope
    curl -sf -X POST "$URL/v1/acp/s1${2:-}" -H "$AUTH" -H 'Content-Type: application/json' -d "$1" >/dev/null
}

START=$(now_ms)
CID=$(docker run -d --init -p 127.0.0.1::2468 --entrypoint sleep "$IMAGE" infinity)
docker exec -d -w /workspace -e SANDBOX_AGENT_LOG_STDOUT=1 -e SANDBOX_AGENT_REQUIRE_PREINSTALL=1 "$CID" \
    sh -c "mkdir -p /workspace && exec sandbox-agent server --no-telemetry --host 0.0.0.0 --port 2468 --token=$TOKEN >>/tmp/sandbox-agent.log 2>&1"
URL="http://$(docker port "$CID" 2468/tcp | head -n1)"
until curl -sf -H "$AUTH" "$URL/v1/health" >/dev/null 2>&1; do sleep 0.01; done
post '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":1,"clientInfo":{"name":"baseline","version":"1"}}}' '?agent=mock'
curl -sfN -H "$AUTH" -H 'Accept: text/event-stream' "$URL/v1/acp/s1" >"$EVENTS" &
SSE=$!
SESSION=$(curl -sf -X POST "$URL/v1/acp/s1" -H "$AUTH" -H 'Content-Type: application/json' \
    -d '{"jsonrpc":"2.0","id":2,"method":"session/new","params":{"cwd":"/workspace","mcpServers":[]}}' |
    sed -n 's/.*"sessionId":"\([^"]*\)".*/\1/p')
post "{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"session/prompt\",\"params\":{\"sessionId\":\"$SESSION\",\"prompt\":[{\"type\":\"text\",\"text\":\"hi\"}]}}"
# The reply is complete once the prompt's response (id 3) is on the stream, after its text chunks.
until grep -q '"id":3' "$EVENTS"; do sleep 0.005; done
END=$(now_ms)
REPLY=$(sed -n 's/.*"agent_message_chunk".*"text":"\([^"]*\)".*/\1/p; s/.*"text":"\([^"]*\)".*"agent_message_chunk".*/\1/p' "$EVENTS" | head -n1)
printf '{"ms": %d, "reply": "%s"}\n' "$((END - START))" "$REPLY"
