# shellcheck shell=bash
# Shared helpers for scripts/setup.sh and scripts/build-image.sh. Source it; do not run it.
#
# Environment knobs (all optional):
#   SANDBOX_WORKER_CACHE          cache root (default ~/.cache/sandbox-worker)
#   SANDBOX_WORKER_BASE_IMAGE     base image to pull (default: BASE_IMAGE from worker/pins.py)
#   SANDBOX_WORKER_DEBIAN_MIRROR  mirror for the debootstrap fallback (default: from apt sources)
#   PYTHON                        interpreter used for the venv (default python3)

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE_DIR="${SANDBOX_WORKER_CACHE:-$HOME/.cache/sandbox-worker}"
export DEBIAN_FRONTEND=noninteractive
# The legacy builder works with every docker CLI we meet (Debian's 20.10 and newer ones
# without buildx) and needs no network.
export DOCKER_BUILDKIT=0

log() { printf '[%s] %s\n' "${LOG_TAG:-setup}" "$*"; }
warn() { printf '[%s] WARNING: %s\n' "${LOG_TAG:-setup}" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "${LOG_TAG:-setup}" "$*" >&2; exit 1; }

# Temporary paths removed when the script exits, however it exits.
_CLEANUP_PATHS=()
_cleanup() {
    local p
    for p in "${_CLEANUP_PATHS[@]+"${_CLEANUP_PATHS[@]}"}"; do
        [[ -e "$p" ]] || continue
        # A failed debootstrap can leave /proc or /sys mounted inside its target.
        grep -o " $p/[^ ]*" /proc/mounts 2>/dev/null | sort -r | xargs -r umount -l 2>/dev/null || true
        rm -rf --one-file-system "$p" || true
    done
}
trap _cleanup EXIT
register_cleanup() { _CLEANUP_PATHS+=("$1"); }

# Print the last lines of a log file to stderr (for error reports).
show_tail() { # file [lines]
    [[ -f "$1" ]] || return 0
    printf -- '----- last lines of %s -----\n' "$1" >&2
    tail -n "${2:-30}" "$1" >&2
    printf -- '-----\n' >&2
}

# Define PIN_<NAME> shell variables from worker/pins.py, the single source of truth.
load_pins() {
    [[ -n "${PIN_SANDBOX_AGENT_VERSION:-}" ]] && return 0
    command -v python3 >/dev/null || die "python3 is required (run scripts/setup.sh first)"
    local assignments
    assignments="$(python3 - "$REPO_ROOT/worker/pins.py" <<'PY'
import runpy, shlex, sys
for name, value in sorted(runpy.run_path(sys.argv[1]).items()):
    if name.isupper() and isinstance(value, str):
        print("PIN_%s=%s" % (name, shlex.quote(value)))
PY
)" || die "cannot read worker/pins.py"
    eval "$assignments"
}

# Take an exclusive lock for the rest of the calling process (fd 9). Concurrent runs wait.
take_lock() { # name
    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/$1.lock"
    flock 9
}

# sha512 of a file in npm's SRI form: sha512-<base64>.
sri_sha512() { # file
    python3 - "$1" <<'PY'
import base64, hashlib, sys
h = hashlib.sha512()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print("sha512-" + base64.b64encode(h.digest()).decode())
PY
}

docker_ready() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

# --- sandbox-agent binary ---------------------------------------------------------------
# Result: SANDBOX_AGENT_BIN=<cache>/sandbox-agent/<version>/sandbox-agent (mode 0755),
# verified against PIN_SANDBOX_AGENT_INTEGRITY and `--version`.
ensure_sandbox_agent() {
    load_pins
    local version="$PIN_SANDBOX_AGENT_VERSION" dir stamp
    dir="$CACHE_DIR/sandbox-agent/$version"
    stamp="$dir/.verified"
    SANDBOX_AGENT_BIN="$dir/sandbox-agent"
    if [[ -x "$SANDBOX_AGENT_BIN" && -f "$stamp" && "$(cat "$stamp")" == "$PIN_SANDBOX_AGENT_INTEGRITY" ]] \
        && [[ "$("$SANDBOX_AGENT_BIN" --version 2>/dev/null)" == "sandbox-agent $version" ]]; then
        log "sandbox-agent $version: cached at $SANDBOX_AGENT_BIN"
        return 0
    fi
    command -v npm >/dev/null || die "npm is required to fetch $PIN_SANDBOX_AGENT_NPM_PACKAGE (run scripts/setup.sh)"
    log "sandbox-agent $version: npm pack $PIN_SANDBOX_AGENT_NPM_PACKAGE@$version"
    mkdir -p "$dir"
    local tmp tgz actual got
    tmp="$(mktemp -d "$dir/.tmp.XXXXXX")"
    register_cleanup "$tmp"
    if ! (cd "$tmp" && npm pack --silent "$PIN_SANDBOX_AGENT_NPM_PACKAGE@$version" >"$tmp/npm.log" 2>&1); then
        show_tail "$tmp/npm.log"
        die "npm pack $PIN_SANDBOX_AGENT_NPM_PACKAGE@$version failed"
    fi
    tgz="$(find "$tmp" -maxdepth 1 -name '*.tgz' -print -quit)"
    [[ -n "$tgz" ]] || die "npm pack produced no tarball"
    actual="$(sri_sha512 "$tgz")"
    [[ "$actual" == "$PIN_SANDBOX_AGENT_INTEGRITY" ]] \
        || die "integrity mismatch for $(basename "$tgz"): got $actual, pinned $PIN_SANDBOX_AGENT_INTEGRITY"
    tar -xzf "$tgz" -C "$tmp" package/bin/sandbox-agent
    chmod 0755 "$tmp/package/bin/sandbox-agent"
    got="$("$tmp/package/bin/sandbox-agent" --version 2>&1 || true)"
    [[ "$got" == "sandbox-agent $version" ]] || die "unexpected --version output: $got"
    mv -f "$tgz" "$dir/$(basename "$tgz")"
    mv -f "$tmp/package/bin/sandbox-agent" "$SANDBOX_AGENT_BIN"
    printf '%s\n' "$PIN_SANDBOX_AGENT_INTEGRITY" >"$stamp"
    log "sandbox-agent $version: verified ($actual) -> $SANDBOX_AGENT_BIN"
}
