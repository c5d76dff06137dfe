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

# Thin sandbox image: BASE_IMAGE (or LOCAL_BASE_IMAGE) + the daemon + the stand-in ACP agent.
SANDBOX_IMAGE = "sandbox-worker/sandbox:0.4.2"
# What scripts/build-image.sh tries to pull first (override: SANDBOX_WORKER_BASE_IMAGE).
BASE_IMAGE = "debian:bookworm-slim"
# Built locally with debootstrap + `docker import` when the pull fails (no registry access).
LOCAL_BASE_IMAGE = "sandbox-worker/base:bookworm"
