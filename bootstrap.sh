#!/usr/bin/env bash
# Set up a Debian 12 machine (as root) to build, run and test TerminAI's
# isolation tiers. Idempotent: a second run checks and returns in seconds.
#
#   ./bootstrap.sh            install Debian packages, the venv, the project
#
# Debian packages come from the host's own apt configuration; Python
# packages from the configured package index. Nothing else is downloaded.
set -euo pipefail
cd "$(dirname "$0")"
say() { printf '[bootstrap] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    say "run as root: it installs Debian packages"; exit 1
fi

kernel_pkg=$(sed -n 's/^package = "\(.*\)"/\1/p' kernel-config/source.toml)
kernel_ver=$(sed -n 's/^version = "\(.*\)"/\1/p' kernel-config/source.toml)

packages=(
    # the VMM and guest tooling
    qemu-system-x86 qemu-utils busybox-static
    # kernel build
    build-essential bc flex bison libelf-dev libssl-dev cpio kmod
    # root filesystem: mkosi's host needs, image writers
    apt dpkg debian-archive-keyring erofs-utils squashfs-tools zstd xz-utils
    # the container tier (the engine; `inv test` starts dockerd when none runs)
    docker.io
    # the Windows brain bundle: Authenticode signing of its PE files
    osslsigncode
    # the pipeline and tests
    git python3 python3-venv python3-dev curl ca-certificates file
    # the terminal tests drive `terminai-shim run -t` like a person, through tmux
    tmux
    # the capability gate's baseline: the everyday tools an agent finds on a host (release/capability)
    jq zip unzip bzip2 wget patch less tree iproute2 tzdata pkg-config
)
command -v node >/dev/null 2>&1 || packages+=(nodejs)
command -v npm >/dev/null 2>&1 || packages+=(npm)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
have_kernel=$(dpkg-query -W -f='${Status} ${Version}' "$kernel_pkg" 2>/dev/null || true)
case "$have_kernel" in
    "install ok installed $kernel_ver") ;;
    *) missing+=("$kernel_pkg=$kernel_ver") ;;
esac

if [ ${#missing[@]} -gt 0 ]; then
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
        say "the pinned $kernel_pkg=$kernel_ver is not on the mirror; installing the current one"
        say "(the kernel build then stops with a sha256 error naming kernel-config/source.toml)"
        apt-get install -y -q --no-install-recommends "${missing[@]/$kernel_pkg=$kernel_ver/$kernel_pkg}"
    fi
fi

# The virtual environment, rebuilt only when the project's dependencies change: every
# third-party package from requirements.lock (pinned, hashed: `inv lock` writes it), then
# the project itself, which brings nothing else in.
stamp_src=$(cat pyproject.toml images/survival-kit/pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.bootstrap-stamp 2>/dev/null)" != "$stamp_src" ]; then
    say "creating the virtual environment in .venv"
    [ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
    if ! { .venv/bin/python -m pip install -q --require-hashes -r requirements.lock &&
           .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . -e images/survival-kit; } \
            >.venv/pip.log 2>&1; then
        cat .venv/pip.log >&2; say "pip install failed (log above)"; exit 1
    fi
    echo "$stamp_src" > .venv/.bootstrap-stamp
fi

say "ready: $(.venv/bin/python --version), $(qemu-system-x86_64 --version | head -1), node $(node --version)"
