"""Pinned versions and image names: the single source of truth.

Pure constants, no imports: shell scripts read this file with
``python3 -c 'import runpy; print(runpy.run_path("worker/pins.py")["NAME"])'``.
"""

# rivet-dev sandbox-agent daemon, installed from the npm tarball's static binary.
SANDBOX_AGENT_VERSION = "0.4.2"
SANDBOX_AGENT_NPM_PACKAGE = "@sandbox-agent/cli-linux-x64"
# npm `dist.integrity` of @sandbox-agent/cli-linux-x64@0.4.2 (sha512 of the .tgz, base64).
SANDBOX_AGENT_INTEGRITY = (
    "sha512-H9Rbqq0DRkCHvakzefJUDrDa2y+vJjlYd5/tefzKbQ34locE13TGNygRLxdEVXpBECjK9wVdBwTVEphQNsOcjw=="
)

# Sandbox image: BASE_IMAGE (or LOCAL_BASE_IMAGE) + the daemon + Node.js + the real agents below + the
# stand-in ACP agent. The tag names its contents, so a checkout that still builds the thin image of the same
# daemon version does not rebuild this one (and the other way round) on a shared Docker engine.
SANDBOX_IMAGE = "sandbox-worker/sandbox:0.4.2-agents"
# What scripts/build-image.sh tries to pull first (override: SANDBOX_WORKER_BASE_IMAGE).
BASE_IMAGE = "debian:bookworm-slim"
# Built locally with debootstrap + `docker import` when the pull fails (no registry access).
LOCAL_BASE_IMAGE = "sandbox-worker/base:bookworm"

# --- Agents preinstalled in SANDBOX_IMAGE (fetched from npm on the build host; see scripts/build-image.sh) ---
# Node.js for the Claude adapter: Debian 12's own package, installed with apt while building the image.
NODEJS_DEBIAN_PACKAGE = "nodejs"
NODEJS_MAJOR = "18"

# Claude Code ACP adapter (bundles Claude Code 2.1.83 in @anthropic-ai/claude-agent-sdk). Installed with
# `npm ci` from sandbox_image/agents/claude-agent-acp.lock.json, which pins every dependency's integrity
# (refresh it with `scripts/build-image.sh --relock` after changing the version).
CLAUDE_AGENT_ACP_NPM_PACKAGE = "@zed-industries/claude-agent-acp"
CLAUDE_AGENT_ACP_VERSION = "0.23.1"

# Codex ACP adapter: a native binary (embeds Codex; needs glibc, libssl3, zlib, no node). We take it from the
# platform package that @zed-industries/codex-acp@0.16.0 depends on.
CODEX_ACP_VERSION = "0.16.0"
CODEX_ACP_NPM_PACKAGE = "@zed-industries/codex-acp-linux-x64"
CODEX_ACP_INTEGRITY = "sha512-xs5zZBLpJuciEbZNx6ZSNL0qCa9h3i/zWpj40sp6QtF+L4Ow/7qzHdBzboGhHdcz1jrLedfZeRFDA2Elj8TLMA=="

# OpenCode (run as `opencode acp`): a native bun-compiled binary (do not strip it). We take it from the platform
# package opencode-ai@1.18.33 selects on x86-64 with AVX2 (its `-baseline` sibling is for CPUs without AVX2).
OPENCODE_VERSION = "1.18.33"
OPENCODE_NPM_PACKAGE = "opencode-linux-x64"
OPENCODE_INTEGRITY = "sha512-q/t/3p2CTxOT9y2kvjesb/LZab2+1eqlhhWA02Be6mjTtmYtNBcBsrI5yDo4Fw7ZSPBW2oyMIGMNRqiKQjiAWw=="

# What the daemon reports as each agent's version (`GET /v1/agents/{id}?config=true`, from `<agent> --version`):
# the daemon stage refuses a sandbox whose agent differs. claude-agent-acp 0.23.1 bundles Claude Code 2.1.83.
AGENT_VERSIONS = {"claude": "2.1.83", "codex": f"codex-acp {CODEX_ACP_VERSION}", "opencode": OPENCODE_VERSION}
