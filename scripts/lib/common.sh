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

# --- agents (the sandbox image's Claude, Codex and OpenCode) ---------------------------------
# Result: AGENTS_DIR=<cache>/agents/<key> holding exactly what the image gets under /opt/agents:
#   claude-agent-acp/  `npm ci` of PIN_CLAUDE_AGENT_ACP_NPM_PACKAGE from sandbox_image/agents/claude-agent-acp.lock.json
#   bin/codex-acp      native binary from PIN_CODEX_ACP_NPM_PACKAGE (integrity-checked)
#   bin/opencode       native binary from PIN_OPENCODE_NPM_PACKAGE (integrity-checked)
# <key> hashes the pins and the lockfile, so a cached copy is reused only for the same inputs.
AGENTS_LOCKFILE="$REPO_ROOT/sandbox_image/agents/claude-agent-acp.lock.json"

# package.json of the Claude adapter install, from the pins (the lockfile must match it).
claude_package_json() {
    printf '{"name":"sandbox-worker-claude-agent-acp","private":true,"dependencies":{"%s":"%s"}}\n' \
        "$PIN_CLAUDE_AGENT_ACP_NPM_PACKAGE" "$PIN_CLAUDE_AGENT_ACP_VERSION"
}

agents_key() {
    {
        claude_package_json
        cat "$AGENTS_LOCKFILE"
        printf '%s %s %s\n' "$PIN_CODEX_ACP_NPM_PACKAGE" "$PIN_CODEX_ACP_VERSION" "$PIN_CODEX_ACP_INTEGRITY"
        printf '%s %s %s\n' "$PIN_OPENCODE_NPM_PACKAGE" "$PIN_OPENCODE_VERSION" "$PIN_OPENCODE_INTEGRITY"
    } | sha256sum | cut -c1-16
}

# npm pack one package version into dir, check its integrity, and extract one file of it to dest (0755).
npm_pack_file() { # package version integrity member dest tmpdir
    local pkg="$1" version="$2" integrity="$3" member="$4" dest="$5" tmp="$6" tgz actual
    mkdir -p "$tmp/pack"
    if ! (cd "$tmp/pack" && npm pack --silent "$pkg@$version" >"$tmp/npm-pack.log" 2>&1); then
        show_tail "$tmp/npm-pack.log"
        die "npm pack $pkg@$version failed"
    fi
    tgz="$(find "$tmp/pack" -maxdepth 1 -name '*.tgz' -print -quit)"
    [[ -n "$tgz" ]] || die "npm pack $pkg@$version produced no tarball"
    actual="$(sri_sha512 "$tgz")"
    [[ "$actual" == "$integrity" ]] || die "integrity mismatch for $pkg@$version: got $actual, pinned $integrity"
    tar -xzf "$tgz" -C "$tmp/pack" "package/$member"
    install -D -m 0755 "$tmp/pack/package/$member" "$dest"
    rm -rf "$tmp/pack"
}

ensure_agents() {
    load_pins
    [[ -f "$AGENTS_LOCKFILE" ]] || die "missing $AGENTS_LOCKFILE (scripts/build-image.sh --relock writes it)"
    local key root stamp
    key="$(agents_key)"
    root="$CACHE_DIR/agents"
    AGENTS_DIR="$root/$key"
    stamp="$AGENTS_DIR/.verified"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
        log "agents: cached at $AGENTS_DIR"
        return 0
    fi
    command -v npm >/dev/null || die "npm is required to fetch the agents (run scripts/setup.sh)"
    local start=$SECONDS tmp
    mkdir -p "$root"
    tmp="$(mktemp -d "$root/.tmp.XXXXXX")"
    register_cleanup "$tmp"
    log "agents: npm ci $PIN_CLAUDE_AGENT_ACP_NPM_PACKAGE@$PIN_CLAUDE_AGENT_ACP_VERSION (lockfile)"
    mkdir -p "$tmp/out/claude-agent-acp"
    claude_package_json >"$tmp/out/claude-agent-acp/package.json"
    cp "$AGENTS_LOCKFILE" "$tmp/out/claude-agent-acp/package-lock.json"
    # --ignore-scripts: nothing of the tree needs an install script (sharp ships prebuilt binaries).
    if ! (cd "$tmp/out/claude-agent-acp" && npm ci --omit=dev --ignore-scripts --no-audit --no-fund \
        >"$tmp/npm-ci.log" 2>&1); then
        show_tail "$tmp/npm-ci.log"
        die "npm ci of the Claude adapter failed (pins changed? run scripts/build-image.sh --relock)"
    fi
    [[ -f "$tmp/out/claude-agent-acp/node_modules/$PIN_CLAUDE_AGENT_ACP_NPM_PACKAGE/dist/index.js" ]] \
        || die "npm ci did not install $PIN_CLAUDE_AGENT_ACP_NPM_PACKAGE"
    log "agents: npm pack $PIN_CODEX_ACP_NPM_PACKAGE@$PIN_CODEX_ACP_VERSION"
    npm_pack_file "$PIN_CODEX_ACP_NPM_PACKAGE" "$PIN_CODEX_ACP_VERSION" "$PIN_CODEX_ACP_INTEGRITY" \
        bin/codex-acp "$tmp/out/bin/codex-acp" "$tmp"
    log "agents: npm pack $PIN_OPENCODE_NPM_PACKAGE@$PIN_OPENCODE_VERSION"
    npm_pack_file "$PIN_OPENCODE_NPM_PACKAGE" "$PIN_OPENCODE_VERSION" "$PIN_OPENCODE_INTEGRITY" \
        bin/opencode "$tmp/out/bin/opencode" "$tmp"
    local got
    got="$("$tmp/out/bin/opencode" --version 2>&1 || true)"
    [[ "$got" == "$PIN_OPENCODE_VERSION" ]] || die "opencode --version printed: ${got:0:200}"
    # Drop other versions' copies (hundreds of MB each), then publish this one.
    find "$root" -mindepth 1 -maxdepth 1 -type d ! -name '.tmp.*' ! -name "$key" -exec rm -rf {} +
    rm -rf "$AGENTS_DIR"
    mv "$tmp/out" "$AGENTS_DIR"
    printf '%s\n' "$key" >"$stamp"
    log "agents: fetched in $((SECONDS - start))s -> $AGENTS_DIR ($(du -sh "$AGENTS_DIR" | cut -f1))"
}

# Rewrite sandbox_image/agents/claude-agent-acp.lock.json from the pins (after changing the adapter version).
relock_agents() {
    load_pins
    command -v npm >/dev/null || die "npm is required"
    local tmp
    tmp="$(mktemp -d)"
    register_cleanup "$tmp"
    claude_package_json >"$tmp/package.json"
    (cd "$tmp" && npm install --package-lock-only --omit=dev --ignore-scripts --no-audit --no-fund >"$tmp/npm.log" 2>&1) \
        || { show_tail "$tmp/npm.log"; die "npm install --package-lock-only failed"; }
    mkdir -p "$(dirname "$AGENTS_LOCKFILE")"
    cp "$tmp/package-lock.json" "$AGENTS_LOCKFILE"
    log "wrote $AGENTS_LOCKFILE"
}
