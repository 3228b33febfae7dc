#!/usr/bin/env bash
# A python3.11 base image for deploy/Dockerfile built from Debian's own packages, for hosts that reach a
# Debian mirror but not Docker Hub. Debian bookworm's python3 is 3.11. Needs root, debootstrap and Docker.
#
#   sudo deploy/debian_base.sh [TAG] [MIRROR]      # default sora-base:bookworm, http://deb.debian.org/debian
#   docker build -f deploy/Dockerfile --build-arg BASE_IMAGE=sora-base:bookworm ...
set -euo pipefail
tag=${1:-sora-base:bookworm}
mirror=${2:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' -c 'CMD ["/bin/bash"]' - "$tag"
docker run --rm "$tag" python3 -c 'import sys, venv; assert sys.version_info[:2] == (3, 11), sys.version'
echo "built $tag"
