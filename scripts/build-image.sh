#!/usr/bin/env bash
# Build the sandbox images (idempotent; a no-op when nothing changed):
#   LOCAL_BASE_IMAGE  bookworm + bash + python3, WITHOUT the daemon. Made from BASE_IMAGE
#                     (or $SANDBOX_WORKER_BASE_IMAGE) when it can be pulled, else with
#                     debootstrap + `docker import` (offline machines).
#   SANDBOX_IMAGE     LOCAL_BASE_IMAGE + sandbox-agent + the stand-in ACP agent (mock-acp),
#                     labelled sandbox-worker.inputs=<hash>; rebuilt only when the hash changes.
# Names and versions come from worker/pins.py. Needs a running Docker engine (scripts/setup.sh).
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

# The Debian mirror the host already uses (deb822 or one-line format), else deb.debian.org.
debian_mirror() {
    if [[ -n "${SANDBOX_WORKER_DEBIAN_MIRROR:-}" ]]; then
        printf '%s\n' "$SANDBOX_WORKER_DEBIAN_MIRROR"
        return
    fi
    python3 - <<'PY'
import glob, re
found = None
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path, encoding="utf-8", errors="replace").read()):
        fields = {}
        for line in stanza.splitlines():
            m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
            if m:
                fields[m.group(1).lower()] = m.group(2).split()
        if "bookworm" in fields.get("suites", []) and "deb" in fields.get("types", ["deb"]):
            uris = [u for u in fields.get("uris", []) if u.startswith("http")]
            if uris:
                found = found or uris[0]
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    except OSError:
        continue
    for line in lines:
        parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(parts) >= 3 and parts[0] == "deb" and parts[2] == "bookworm" and parts[1].startswith("http"):
            found = found or parts[1]
print(found or "http://deb.debian.org/debian")
PY
}

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

inputs_hash() { # base image id
    {
        printf 'dockerfile\n'; cat "$REPO_ROOT/sandbox_image/Dockerfile"
        printf '\nmock-acp\n'; cat "$REPO_ROOT/worker/assets/mock-acp"
        printf '\nsandbox-agent %s %s\n' "$PIN_SANDBOX_AGENT_VERSION" "$PIN_SANDBOX_AGENT_INTEGRITY"
        printf 'base %s\n' "$1"
    } | sha256sum | cut -d' ' -f1
}

main() {
    load_pins
    docker_ready || die "the Docker engine is not reachable (run scripts/setup.sh)"
    take_lock image
    ensure_sandbox_agent
    ensure_base_image

    local base_id inputs old_id ctx logf
    base_id="$(image_id "$PIN_LOCAL_BASE_IMAGE")"
    inputs="$(inputs_hash "$base_id")"
    if [[ "$(image_label "$PIN_SANDBOX_IMAGE" "$INPUTS_LABEL")" == "$inputs" ]]; then
        log "sandbox image $PIN_SANDBOX_IMAGE: up to date"
        return 0
    fi
    old_id="$(image_id "$PIN_SANDBOX_IMAGE" 2>/dev/null || true)"

    ctx="$(mktemp -d)"
    register_cleanup "$ctx"
    logf="$ctx.log"
    register_cleanup "$logf"
    install -m 0644 "$REPO_ROOT/sandbox_image/Dockerfile" "$ctx/Dockerfile"
    install -m 0755 "$SANDBOX_AGENT_BIN" "$ctx/sandbox-agent"
    install -m 0755 "$REPO_ROOT/worker/assets/mock-acp" "$ctx/mock-acp"
    log "building $PIN_SANDBOX_IMAGE (FROM $PIN_LOCAL_BASE_IMAGE)"
    if ! docker build --build-arg "BASE_IMAGE=$PIN_LOCAL_BASE_IMAGE" --label "$INPUTS_LABEL=$inputs" \
        -t "$PIN_SANDBOX_IMAGE" "$ctx" >"$logf" 2>&1; then
        show_tail "$logf" 40
        die "docker build of $PIN_SANDBOX_IMAGE failed"
    fi
    local got
    got="$(docker run --rm "$PIN_SANDBOX_IMAGE" sandbox-agent --version 2>&1 || true)"
    [[ "$got" == "sandbox-agent $PIN_SANDBOX_AGENT_VERSION" ]] \
        || die "$PIN_SANDBOX_IMAGE: sandbox-agent --version printed: $got"
    docker run --rm "$PIN_SANDBOX_IMAGE" test -x /root/.local/share/sandbox-agent/bin/agent_processes/mock-acp \
        || die "$PIN_SANDBOX_IMAGE: mock-acp is missing or not executable"
    # Drop the image this build replaced, unless something still uses it.
    if [[ -n "$old_id" && "$old_id" != "$(image_id "$PIN_SANDBOX_IMAGE")" ]]; then
        docker image rm "$old_id" >/dev/null 2>&1 || true
    fi
    log "sandbox image $PIN_SANDBOX_IMAGE: built ($(docker image inspect --format '{{.Size}}' "$PIN_SANDBOX_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
}

main "$@"
