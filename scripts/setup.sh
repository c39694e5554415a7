#!/usr/bin/env bash
# Idempotent set-up on Debian 12: system packages, a venv on Debian's python3 and the project in it.
# Used by `make demo`, `make test` and .ci/run. Re-running it is cheap when everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PKGS=(python3 python3-venv python3-dev python3-libnbd libnbd-bin nbdkit qemu-utils fio fuse3
          libfuse3-dev pkg-config gcc make e2fsprogs iproute2 util-linux kmod qemu-system-common tmux
          rsync zstd)
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

missing=()
for p in "${DEB_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv is built on Debian's python3 so that libnbd's module (python3-libnbd, built for it) loads.
# Only that module is exposed, through a .pth listing a private folder of symlinks: the rest of
# Debian's dist-packages stays out of the venv.
PY=/usr/bin/python3
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.base_prefix != "/usr")' 2>/dev/null; then
    rm -rf .venv
    "$PY" -m venv .venv
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p .venv/debian-nbd
for f in /usr/lib/python3/dist-packages/nbd.py /usr/lib/python3/dist-packages/libnbdmod*.so; do
    ln -sf "$f" .venv/debian-nbd/
done
echo "$(pwd)/.venv/debian-nbd" > "$site/debian_nbd.pth"

stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing Python packages into .venv"
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
.venv/bin/python -c 'import nbd, trio, pyfuse3, xxhash, zstandard, rich, textual, prometheus_client' \
    || { echo "setup: the venv cannot import its dependencies" >&2; exit 1; }
