#!/usr/bin/env bash
# Build the sandbox images (idempotent; a no-op when nothing changed):
#   LOCAL_BASE_IMAGE  bookworm + bash + python3, WITHOUT the daemon. Made from BASE_IMAGE
#                     (or $SANDBOX_WORKER_BASE_IMAGE) when it can be pulled, else with
#                     debootstrap + `docker import` (offline machines).
#   SANDBOX_IMAGE     LOCAL_BASE_IMAGE + Node.js (Debian's, apt from the host's mirror) + the Claude, Codex and
#                     OpenCode ACP adapters (npm on the host, cached in ~/.cache/sandbox-worker/agents) +
#                     sandbox-agent and its token front + the stand-in ACP agent (mock-acp), labelled
#                     sandbox-worker.inputs=<hash>; rebuilt only when the hash changes.
# Names and versions come from worker/pins.py. Needs a running Docker engine (scripts/setup.sh).
#   --relock   rewrite sandbox_image/agents/claude-agent-acp.lock.json from the pins, then build
set -euo pipefail
LOG_TAG=image
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

INPUTS_LABEL="sandbox-worker.inputs"
SOURCE_LABEL="sandbox-worker.base-source"
DEBOOTSTRAP_SOURCE="debootstrap:bookworm"

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
image_id() { docker image inspect --format '{{.Id}}' "$1"; }
image_label() { # image label -> value, empty when absent
    local v
    v="$(docker image inspect --format "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true)"
    [[ "$v" == "<no value>" ]] && v=""
    printf '%s\n' "$v"
}

# apt sources for the image build: the host's Debian entries for bookworm, -updates and -security (main
# component), SANDBOX_WORKER_DEBIAN_MIRROR replacing the first two when set; else deb.debian.org.
apt_sources() {
    python3 - "${SANDBOX_WORKER_DEBIAN_MIRROR:-}" <<'PY'
import glob, re, sys
override = sys.argv[1]
suites = ("bookworm", "bookworm-updates", "bookworm-security")
found = {}
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path, encoding="utf-8", errors="replace").read()):
        fields = {}
        for line in stanza.splitlines():
            m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
            if m:
                fields[m.group(1).lower()] = m.group(2).split()
        if "deb" not in fields.get("types", ["deb"]) or "main" not in fields.get("components", []):
            continue
        for uri in fields.get("uris", []):
            for suite in fields.get("suites", []):
                if suite in suites and uri.startswith("http"):
                    found.setdefault(suite, uri)
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    except OSError:
        continue
    for line in lines:
        parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(parts) >= 4 and parts[0] == "deb" and parts[2] in suites and "main" in parts[3:] and parts[1].startswith("http"):
            found.setdefault(parts[2], parts[1])
if override:
    found["bookworm"] = found["bookworm-updates"] = override
found.setdefault("bookworm", "http://deb.debian.org/debian")
for suite in suites:
    if suite in found:
        print(f"deb {found[suite]} {suite} main")
PY
}

# The Debian mirror of bookworm itself, for debootstrap.
debian_mirror() { apt_sources | awk '$3 == "bookworm" { print $2; exit }'; }

build_base_with_debootstrap() {
    command -v debootstrap >/dev/null || die "debootstrap is not installed (run scripts/setup.sh)"
    local mirror root logf
    mirror="$(debian_mirror)"
    root="$(mktemp -d /var/tmp/sandbox-worker-rootfs.XXXXXX)"
    register_cleanup "$root"
    logf="$root.log"
    register_cleanup "$logf"
    mkdir -p "$CACHE_DIR/debootstrap-debs"
    log "debootstrap bookworm (minbase + python3) from $mirror; takes a few minutes"
    if ! debootstrap --variant=minbase --include=python3,ca-certificates \
        --cache-dir="$CACHE_DIR/debootstrap-debs" \
        bookworm "$root" "$mirror" >"$logf" 2>&1; then
        show_tail "$logf" 40
        die "debootstrap failed (mirror $mirror; set SANDBOX_WORKER_DEBIAN_MIRROR to use another)"
    fi
    # Keep the rootfs small (like debian:*-slim: no docs, man pages or translations, also for
    # packages installed later) and free of host details.
    [[ -n "$root" && "$root" != / && -d "$root/etc/dpkg" ]] || die "bad rootfs path: '$root'"
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
        'path-exclude /usr/share/groff/*' 'path-exclude /usr/share/info/*' \
        'path-exclude /usr/share/linda/*' 'path-exclude /usr/share/lintian/overrides/*' \
        'path-exclude /usr/share/locale/*' 'path-exclude /usr/share/man/*' \
        >"$root/etc/dpkg/dpkg.cfg.d/sandbox-worker-slim"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
        "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/archives/partial/* \
        "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/groff/* \
        "$root"/usr/share/locale/* "$root"/usr/share/lintian/overrides/* \
        "$root"/tmp/* "$root"/var/tmp/* \
        "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old "$root"/var/log/*
    find "$root/usr/share/doc" -mindepth 1 -type f ! -name copyright -delete 2>/dev/null || true
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
    : >"$root/etc/hostname"
    : >"$root/etc/resolv.conf"
    for tool in bash python3 sleep; do
        chroot "$root" /usr/bin/env "$tool" --version >/dev/null 2>&1 || die "rootfs lacks $tool"
    done
    log "docker import -> $PIN_LOCAL_BASE_IMAGE"
    tar --numeric-owner -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL $SOURCE_LABEL=$DEBOOTSTRAP_SOURCE" \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase --include=python3,ca-certificates bookworm" \
        - "$PIN_LOCAL_BASE_IMAGE" >/dev/null
}

build_base_from() { # pulled image
    local ctx logf
    ctx="$(mktemp -d)"
    register_cleanup "$ctx"
    logf="$ctx.log"
    register_cleanup "$logf"
    cp "$REPO_ROOT/sandbox_image/base.Dockerfile" "$ctx/Dockerfile"
    log "building $PIN_LOCAL_BASE_IMAGE from $1"
    if ! docker build --build-arg "BASE_IMAGE=$1" --label "$SOURCE_LABEL=$1" \
        -t "$PIN_LOCAL_BASE_IMAGE" "$ctx" >"$logf" 2>&1; then
        show_tail "$logf" 40
        die "building $PIN_LOCAL_BASE_IMAGE from $1 failed"
    fi
}

# Make sure PIN_LOCAL_BASE_IMAGE exists and matches the requested base.
ensure_base_image() {
    local requested="${SANDBOX_WORKER_BASE_IMAGE:-$PIN_BASE_IMAGE}" source=""
    if image_exists "$PIN_LOCAL_BASE_IMAGE"; then
        source="$(image_label "$PIN_LOCAL_BASE_IMAGE" "$SOURCE_LABEL")"
        # The debootstrap fallback stands in for the default base: do not retry the pull
        # on every run (remove the image to force a retry).
        if [[ "$requested" == "$PIN_LOCAL_BASE_IMAGE" || "$source" == "$requested" \
            || ( "$source" == "$DEBOOTSTRAP_SOURCE" && "$requested" == "$PIN_BASE_IMAGE" ) ]]; then
            log "base image $PIN_LOCAL_BASE_IMAGE: present (from ${source:-unknown})"
            return 0
        fi
        log "base image $PIN_LOCAL_BASE_IMAGE comes from ${source:-unknown}, wanted $requested: rebuilding"
    fi
    if [[ "$requested" == "$PIN_LOCAL_BASE_IMAGE" ]]; then
        build_base_with_debootstrap
        return 0
    fi
    local pull_error=""
    if ! image_exists "$requested"; then
        log "docker pull $requested"
        pull_error="$(timeout 300 docker pull -q "$requested" 2>&1 >/dev/null)" || pull_error="${pull_error:-pull failed}"
    fi
    if [[ -z "$pull_error" ]]; then
        build_base_from "$requested"
    elif [[ "$requested" == "$PIN_BASE_IMAGE" ]]; then
        log "cannot pull $requested: ${pull_error:0:160}"
        log "building the base image locally instead"
        build_base_with_debootstrap
    else
        die "cannot pull SANDBOX_WORKER_BASE_IMAGE=$requested: $pull_error"
    fi
}

inputs_hash() { # base image id, apt sources file
    {
        printf 'dockerfile\n'; cat "$REPO_ROOT/sandbox_image/Dockerfile"
        printf '\nmock-acp\n'; cat "$REPO_ROOT/worker/assets/mock-acp"
        printf '\nacp-launcher\n'; cat "$REPO_ROOT/worker/assets/acp-launcher"
        printf '\ndaemon-front\n'; cat "$REPO_ROOT/worker/assets/daemon-front"
        printf '\nagent scripts\n'; (cd "$REPO_ROOT/sandbox_image/agents/bin" && find . -type f | LC_ALL=C sort | xargs sha256sum)
        printf '\nagents %s\n' "$(agents_key)"
        printf 'nodejs %s %s\n' "$PIN_NODEJS_DEBIAN_PACKAGE" "$PIN_NODEJS_MAJOR"
        printf 'apt\n'; cat "$2"
        printf '\nsandbox-agent %s %s\n' "$PIN_SANDBOX_AGENT_VERSION" "$PIN_SANDBOX_AGENT_INTEGRITY"
        printf 'base %s\n' "$1"
    } | sha256sum | cut -d' ' -f1
}

# The build context described in sandbox_image/Dockerfile.
make_context() { # dir apt-sources-file
    local ctx="$1" data="$1/sandbox-agent-bin"
    install -m 0644 "$REPO_ROOT/sandbox_image/Dockerfile" "$ctx/Dockerfile"
    install -m 0644 "$2" "$ctx/apt-sources.list"
    install -m 0755 "$SANDBOX_AGENT_BIN" "$ctx/sandbox-agent"
    install -m 0755 "$REPO_ROOT/worker/assets/daemon-front" "$ctx/daemon-front"
    # Hard links when the cache is on the same file system (hundreds of MB), else a copy.
    cp -al "$AGENTS_DIR" "$ctx/agents" 2>/dev/null || { rm -rf "$ctx/agents"; cp -a "$AGENTS_DIR" "$ctx/agents"; }
    rm -f "$ctx/agents/.verified"
    install -m 0755 "$REPO_ROOT/worker/assets/acp-launcher" "$ctx/agents/bin/acp-launcher"
    cp -a "$REPO_ROOT/sandbox_image/agents/bin" "$data"
    sed -i "s/@CODEX_ACP_VERSION@/$PIN_CODEX_ACP_VERSION/" "$data/codex"
    # sandbox-agent runs $XDG_DATA_HOME/sandbox-agent/bin/agent_processes/mock-acp for the `mock` agent and
    # treats it as installed when the file exists: no `install-agent` step is needed, and
    # `install-agent mock --reinstall` would overwrite it with the built-in echo launcher.
    install -m 0755 "$REPO_ROOT/worker/assets/mock-acp" "$data/agent_processes/mock-acp"
    chmod -R u=rwX,go=rX "$data"
}

# Fail unless the image has every agent where the daemon looks, and the daemon reports them installed.
check_image() {
    local got
    got="$(docker run --rm "$PIN_SANDBOX_IMAGE" sandbox-agent --version 2>&1 || true)"
    [[ "$got" == "sandbox-agent $PIN_SANDBOX_AGENT_VERSION" ]] \
        || die "$PIN_SANDBOX_IMAGE: sandbox-agent --version printed: $got"
    got="$(docker run --rm "$PIN_SANDBOX_IMAGE" sh -c '
        set -e
        d=/root/.local/share/sandbox-agent/bin
        test -x $d/agent_processes/mock-acp
        for a in claude codex opencode; do test -x $d/$a; test -x $d/agent_processes/$a-acp; $d/$a --version >/dev/null; done
        SANDBOX_AGENT_REQUIRE_PREINSTALL=1 sandbox-agent server --no-telemetry --host 127.0.0.1 --port 2468 --no-token \
            >/dev/null 2>&1 &
        for i in $(seq 100); do
            python3 -c "import urllib.request as u; print(u.urlopen(\"http://127.0.0.1:2468/v1/agents\").read().decode())" \
                2>/dev/null && exit 0
            sleep 0.1
        done
        exit 1' 2>&1)" || die "$PIN_SANDBOX_IMAGE: agent check failed: ${got:0:400}"
    python3 - "$got" <<'PY' || die "$PIN_SANDBOX_IMAGE: the daemon does not report the agents installed"
import json, sys
installed = {a["id"]: a["installed"] for a in json.loads(sys.argv[1])["agents"]}
missing = [a for a in ("claude", "codex", "opencode", "mock") if not installed.get(a)]
if missing:
    sys.exit(f"not installed: {missing}")
PY
}

main() {
    load_pins
    if [[ "${1:-}" == --relock ]]; then
        relock_agents
    elif [[ $# -gt 0 ]]; then
        die "usage: $0 [--relock]"
    fi
    docker_ready || die "the Docker engine is not reachable (run scripts/setup.sh)"
    take_lock image
    ensure_sandbox_agent
    ensure_agents
    ensure_base_image

    local base_id inputs old_id ctx logf sources start=$SECONDS
    sources="$(mktemp)"
    register_cleanup "$sources"
    apt_sources >"$sources"
    base_id="$(image_id "$PIN_LOCAL_BASE_IMAGE")"
    inputs="$(inputs_hash "$base_id" "$sources")"
    if [[ "$(image_label "$PIN_SANDBOX_IMAGE" "$INPUTS_LABEL")" == "$inputs" ]]; then
        log "sandbox image $PIN_SANDBOX_IMAGE: up to date"
        return 0
    fi
    old_id="$(image_id "$PIN_SANDBOX_IMAGE" 2>/dev/null || true)"

    ctx="$(mktemp -d "$CACHE_DIR/.context.XXXXXX")"  # next to the agents cache, for hard links
    register_cleanup "$ctx"
    logf="$ctx.log"
    register_cleanup "$logf"
    make_context "$ctx" "$sources"
    log "building $PIN_SANDBOX_IMAGE (FROM $PIN_LOCAL_BASE_IMAGE; apt: $(paste -sd';' "$sources"))"
    # --network host: apt reaches the mirror exactly as the host does (no bridge NAT or DNS needed).
    if ! docker build --network host --build-arg "BASE_IMAGE=$PIN_LOCAL_BASE_IMAGE" \
        --build-arg "NODEJS_PACKAGE=$PIN_NODEJS_DEBIAN_PACKAGE" --build-arg "NODEJS_MAJOR=$PIN_NODEJS_MAJOR" \
        --label "$INPUTS_LABEL=$inputs" -t "$PIN_SANDBOX_IMAGE" "$ctx" >"$logf" 2>&1; then
        show_tail "$logf" 40
        die "docker build of $PIN_SANDBOX_IMAGE failed"
    fi
    check_image
    # Drop the image this build replaced, unless something still uses it.
    if [[ -n "$old_id" && "$old_id" != "$(image_id "$PIN_SANDBOX_IMAGE")" ]]; then
        docker image rm "$old_id" >/dev/null 2>&1 || true
    fi
    log "sandbox image $PIN_SANDBOX_IMAGE: built in $((SECONDS - start))s ($(docker image inspect --format '{{.Size}}' "$PIN_SANDBOX_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
}

main "$@"
