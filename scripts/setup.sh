#!/usr/bin/env bash
# Machine setup for sandbox-worker development, tests and CI (Debian 12, run as root).
# Idempotent: every step is skipped when already satisfied, so a second run takes seconds.
# `--venv-only` does step 4 alone (what `make unit` needs: no Redis, no Docker).
#   1. apt packages: redis-server, docker.io, docker-compose, debootstrap, chromium (the browser test) (+ npm,
#      python3-venv when missing)
#   2. redis-server on 127.0.0.1:6379, append-only (records, leases and the fleet marker survive a restart;
#      a running Redis without AOF is switched to it with CONFIG SET)
#   3. dockerd (no systemd here: started in the background, log in /var/log/dockerd.log)
#   4. .venv with `pip install -e '.[dev]'` (re-run only when pyproject.toml changes)
#   5. the sandbox-agent binary (npm tarball, integrity-checked, cached)
#   6. the sandbox images (scripts/build-image.sh)
set -euo pipefail
LOG_TAG=setup
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

DOCKERD_LOG=/var/log/dockerd.log
REDIS_LOG=/var/log/redis-sandbox-worker.log
REDIS_DIR=${REDIS_DIR:-/var/lib/redis-sandbox-worker}
VENV="$REPO_ROOT/.venv"
PYTHON="${PYTHON:-python3}"

# True when a process with this exact name runs (no procps needed).
proc_running() { grep -qx "$1" /proc/[0-9]*/comm 2>/dev/null; }

_apt_updated=0
apt_install() { # [--no-install-recommends] packages...
    local opts=()
    [[ "${1:-}" == --no-install-recommends ]] && { opts+=("$1"); shift; }
    [[ $# -gt 0 ]] || return 0
    [[ "$(id -u)" == 0 ]] || die "need root to apt-get install: $*"
    if [[ "$_apt_updated" == 0 ]]; then
        log "apt-get update"
        apt-get update -qq >/dev/null
        _apt_updated=1
    fi
    log "apt-get install $*"
    apt-get install -y -qq "${opts[@]+"${opts[@]}"}" "$@" >/dev/null
}

step_packages() {
    # docker.io with its recommends (apparmor, cgroupfs-mount, ...) like a normal install;
    # npm without them (they are a compiler toolchain).
    local need=() need_lean=()
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null || need+=(redis-server)
    command -v dockerd >/dev/null && command -v docker >/dev/null || need+=(docker.io)
    command -v docker-compose >/dev/null || need+=(docker-compose) # compose.yaml and its test
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v iptables >/dev/null || need+=(iptables)
    [[ -s /etc/ssl/certs/ca-certificates.crt ]] || need+=(ca-certificates)
    command -v "$PYTHON" >/dev/null || need+=(python3 python3-venv)
    command -v npm >/dev/null || need_lean+=(npm)
    # The web app's browser test drives Debian's chromium with Playwright (its own browser download is not reachable).
    command -v chromium >/dev/null || need_lean+=(chromium)
    if [[ ${#need[@]} -eq 0 && ${#need_lean[@]} -eq 0 ]]; then
        log "packages: present"
        return 0
    fi
    if [[ ${#need[@]} -gt 0 ]]; then apt_install "${need[@]}"; fi
    if [[ ${#need_lean[@]} -gt 0 ]]; then apt_install --no-install-recommends "${need_lean[@]}"; fi
}

step_redis() {
    if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
        log "redis: running on 127.0.0.1:6379"
        # A Redis that loses its data on restart makes the reaper refuse to act (docs/operations.md): turn AOF on.
        if redis-cli -h 127.0.0.1 -p 6379 config get appendonly 2>/dev/null | grep -qx no; then
            if redis-cli -h 127.0.0.1 -p 6379 config set appendonly yes 2>/dev/null | grep -q OK; then
                log "redis: append-only turned on (CONFIG SET; add 'appendonly yes' to its config to keep it)"
            else
                log "redis: WARNING: running without append-only and CONFIG SET was refused; a restart loses its data"
            fi
        fi
        return 0
    fi
    log "redis: starting redis-server on 127.0.0.1:6379"
    mkdir -p "$REDIS_DIR"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly yes --appendfsync everysec \
        --dir "$REDIS_DIR" --logfile "$REDIS_LOG" >/dev/null || { show_tail "$REDIS_LOG"; die "redis-server did not start"; }
    local i
    for ((i = 0; i < 100; i++)); do
        redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG && { log "redis: ready"; return 0; }
        sleep 0.1
    done
    show_tail "$REDIS_LOG"
    die "redis-server is not answering on 127.0.0.1:6379"
}

step_docker() {
    if docker_ready; then
        log "docker: engine $(docker version --format '{{.Server.Version}}' 2>/dev/null) running"
        return 0
    fi
    if proc_running dockerd; then
        log "docker: dockerd is running but not answering yet; waiting"
    else
        [[ "$(id -u)" == 0 ]] || die "need root to start dockerd"
        # A pid file left by a dockerd that died makes the next one refuse to start.
        if [[ -f /var/run/docker.pid ]] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
            rm -f /var/run/docker.pid
        fi
        log "docker: starting dockerd (log: $DOCKERD_LOG)"
        setsid nohup dockerd </dev/null >>"$DOCKERD_LOG" 2>&1 &
    fi
    local i
    for ((i = 0; i < 120; i++)); do
        docker_ready && { log "docker: ready after $((i / 2))s"; return 0; }
        if ((i > 2)) && ! proc_running dockerd; then
            show_tail "$DOCKERD_LOG"
            die "dockerd exited during start-up"
        fi
        sleep 0.5
    done
    show_tail "$DOCKERD_LOG"
    die "dockerd did not become ready within 60s"
}

step_venv() {
    local pyproject="$REPO_ROOT/pyproject.toml" stamp="$VENV/.sandbox-worker-pyproject.sha256" want
    if [[ ! -f "$pyproject" ]]; then
        warn "no pyproject.toml yet: skipping the virtualenv"
        return 0
    fi
    if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c '' 2>/dev/null; then
        log "venv: creating $VENV"
        rm -rf "$VENV"
        if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
            # Debian's own python3 ships venv/ensurepip separately.
            rm -rf "$VENV"
            apt_install python3-venv
            "$PYTHON" -m venv "$VENV"
        fi
    fi
    want="$(sha256sum "$pyproject" | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        log "venv: up to date"
        return 0
    fi
    log "venv: pip install -e '.[dev]'"
    local pip_log="$VENV/pip-install.log"
    if ! (cd "$REPO_ROOT" && "$VENV/bin/python" -m pip install -q -e '.[dev]') >"$pip_log" 2>&1; then
        show_tail "$pip_log" 40
        die "pip install -e '.[dev]' failed (full log: $pip_log)"
    fi
    printf '%s\n' "$want" >"$stamp"
    log "venv: installed"
}

main() {
    local start=$SECONDS
    if [[ "${1:-}" == --venv-only ]]; then # `make unit`: the Python environment only, no services or images
        command -v "$PYTHON" >/dev/null || apt_install python3 python3-venv
        step_venv
        return 0
    fi
    step_packages
    load_pins
    step_redis
    step_docker
    step_venv
    take_lock setup
    ensure_sandbox_agent
    "$REPO_ROOT/scripts/build-image.sh"
    log "done in $((SECONDS - start))s"
}

main "$@"
