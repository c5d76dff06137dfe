# The project's base image (no daemon), built from a pulled image when the registry is reachable.
# When it is not, scripts/build-image.sh makes the same tag with debootstrap + `docker import`.
# Guarantees what the thin image and the stand-in agent need: bash, coreutils, python3, CA certs.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN set -e; \
    if command -v python3 >/dev/null && command -v bash >/dev/null; then exit 0; fi; \
    if command -v apt-get >/dev/null; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 bash ca-certificates; \
        rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    elif command -v apk >/dev/null; then \
        apk add --no-cache python3 bash coreutils ca-certificates; \
    else \
        echo "base image has no python3 and no apt-get/apk to install it" >&2; exit 1; \
    fi
CMD ["/bin/bash"]
