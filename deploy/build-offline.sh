#!/usr/bin/env bash
# Build the Softserve image without Docker Hub: a Debian base made with debootstrap from a Debian
# mirror, then `docker build` on it with pip going to your PyPI mirror. Run as root on a machine
# with docker.io and debootstrap (see --help). Every step is printed before it runs.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deploy/build-offline.sh [options]

Builds a base image (Debian bookworm, Python 3.11) with debootstrap, makes it trust your CA
certificates, imports it with `docker import`, then builds the Softserve image on it with
`docker build --network host` (so the build reaches this host's mirrors and 127.0.0.1).

Needs: root, `apt-get install docker.io debootstrap`, a running dockerd (`dockerd &` or
`systemctl start docker`), a Debian mirror, a PyPI mirror, and CPU torch (a wheel directory or
a mirror of the PyTorch CPU index: PyPI's own torch is the multi-GB CUDA build).

Options:
  --debian-mirror URL  Debian mirror for debootstrap (and apt inside the build).
                       Default: the first http(s) URI in this host's apt sources
  --suite NAME         Debian suite (default bookworm: its python3 is 3.11)
  --ca-cert FILE       a CA certificate (PEM) the image must trust, e.g. your mirror's or proxy's
                       private CA; repeatable. Default: every *.crt in this host's
                       /usr/local/share/ca-certificates (where a private CA is usually installed)
  --pip-conf FILE      becomes /etc/pip.conf of the base, so pip in the build uses your mirror
                       (e.g. `[global]` + `index-url = https://pypi.example/simple`).
                       Default: this host's /etc/pip.conf, if there is one
  --index-url URL      shorthand: a pip.conf with this index-url (overrides --pip-conf)
  --wheels DIR         a local directory of wheels (CPU torch: torch-2.13.0+cpu-...whl); served
                       on 127.0.0.1 during the build and passed as TORCH_FIND_LINKS
  --find-links URL     a find-links URL for torch that the build container can reach
                       (with --network host, 127.0.0.1 is this host)
  --torch-index URL    an index serving torch (TORCH_INDEX_URL), e.g. a mirror of
                       https://download.pytorch.org/whl/cpu (or .../cu128 with --cuda).
                       Default: none, pip's configured index plus --wheels/--find-links
  --torch-spec SPEC    TORCH_SPEC (default torch==2.13.0)
  --cuda               the GPU image: TORCH_EXPECT=cuda, tag softserve:gpu (needs a CUDA torch
                       from --torch-index, --wheels/--find-links or PyPI's default torch)
  --tag NAME           image tag (default softserve, or softserve:gpu with --cuda)
  --base-tag NAME      base image tag (default softserve-base:<suite>)
  --rebuild-base       debootstrap again even if the base image exists
  --no-cache           pass --no-cache to docker build
  -h, --help           this text
EOF
}

suite=bookworm
debian_mirror=""
ca_certs=()
pip_conf=""
index_url=""
wheels=""
find_links=""
torch_index=""
torch_spec="torch==2.13.0"
torch_expect=cpu
tag=""
base_tag=""
rebuild_base=0
no_cache=()

while [ $# -gt 0 ]; do
    case "$1" in
        --debian-mirror) debian_mirror="$2"; shift 2 ;;
        --suite) suite="$2"; shift 2 ;;
        --ca-cert) ca_certs+=("$2"); shift 2 ;;
        --pip-conf) pip_conf="$2"; shift 2 ;;
        --index-url) index_url="$2"; shift 2 ;;
        --wheels) wheels="$2"; shift 2 ;;
        --find-links) find_links="$2"; shift 2 ;;
        --torch-index) torch_index="$2"; shift 2 ;;
        --torch-spec) torch_spec="$2"; shift 2 ;;
        --cuda) torch_expect=cuda; shift ;;
        --tag) tag="$2"; shift 2 ;;
        --base-tag) base_tag="$2"; shift 2 ;;
        --rebuild-base) rebuild_base=1; shift ;;
        --no-cache) no_cache=(--no-cache); shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "build-offline.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "build-offline.sh: $*" >&2; exit 1; }
run() { echo "+ $*" >&2; "$@"; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -n "$tag" ] || { [ "$torch_expect" = cuda ] && tag=softserve:gpu || tag=softserve; }
[ -n "$base_tag" ] || base_tag="softserve-base:$suite"

if [ "$torch_expect" = cpu ] && [ -z "$wheels$find_links$torch_index" ]; then
    die "CPU torch is not on PyPI (its torch is the CUDA build): pass --wheels DIR, --find-links URL or --torch-index URL"
fi
[ -z "$wheels" ] || [ -d "$wheels" ] || die "--wheels $wheels is not a directory"
[ "$(id -u)" = 0 ] || die "run as root (debootstrap and chroot need it)"
command -v docker >/dev/null || die "no docker client: apt-get install -y docker.io"
docker info >/dev/null 2>&1 || die "dockerd does not answer: start it (systemctl start docker, or dockerd &)"

if [ -z "$debian_mirror" ]; then
    debian_mirror="$(grep -hoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)"
    [ -n "$debian_mirror" ] || die "no Debian mirror in this host's apt sources: pass --debian-mirror URL"
fi
if [ ${#ca_certs[@]} -eq 0 ]; then
    for cert in /usr/local/share/ca-certificates/*.crt; do
        [ -e "$cert" ] && ca_certs+=("$cert")
    done
fi
[ -n "$pip_conf" ] || { [ -f /etc/pip.conf ] && pip_conf=/etc/pip.conf; }

# ---- 1. the base: debootstrap, CA certificates, pip.conf, docker import ---------------------------
if [ "$rebuild_base" = 1 ] || ! docker image inspect "$base_tag" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || die "no debootstrap: apt-get install -y debootstrap"
    rootfs="$(mktemp -d /tmp/softserve-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    run debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$suite" "$rootfs" "$debian_mirror"
    for cert in "${ca_certs[@]}"; do
        [ -f "$cert" ] || die "--ca-cert $cert: no such file"
        # update-ca-certificates only picks up files ending in .crt
        run cp "$cert" "$rootfs/usr/local/share/ca-certificates/$(basename "${cert%.*}").crt"
    done
    run chroot "$rootfs" update-ca-certificates
    if [ -n "$index_url" ]; then
        printf '[global]\nindex-url = %s\n' "$index_url" > "$rootfs/etc/pip.conf"
    elif [ -n "$pip_conf" ]; then
        run cp "$pip_conf" "$rootfs/etc/pip.conf"
    fi
    [ ! -f "$rootfs/etc/pip.conf" ] || { echo "base /etc/pip.conf:" >&2; sed 's/^/    /' "$rootfs/etc/pip.conf" >&2; }
    # Docs, man pages, locales and apt's package lists are of no use in a server image.
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
        'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
        'path-exclude /usr/share/locale/*' > "$rootfs/etc/dpkg/dpkg.cfg.d/01-softserve-slim"
    find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
    rm -rf "$rootfs"/usr/share/{man,info,locale}/* "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
    echo "+ tar -C $rootfs -c . | docker import - $base_tag" >&2
    tar -C "$rootfs" --numeric-owner -c . | docker import --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' - "$base_tag" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
else
    echo "build-offline.sh: using the existing $base_tag (--rebuild-base to make it again)" >&2
fi

# ---- 2. the image -------------------------------------------------------------------------------
server_pid=""
cleanup() { [ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true; }
trap cleanup EXIT
if [ -n "$wheels" ] && [ -z "$find_links" ]; then
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    python3 -m http.server --bind 127.0.0.1 --directory "$wheels" "$port" >/dev/null 2>&1 &
    server_pid=$!
    find_links="http://127.0.0.1:$port/"
    for _ in $(seq 50); do
        python3 -c "import urllib.request; urllib.request.urlopen('$find_links', timeout=1)" 2>/dev/null && break
        sleep 0.1
    done
fi

# --network host: the build's pip and apt use this host's DNS, its mirrors and 127.0.0.1 (the wheel
# server above). An empty TORCH_INDEX_URL leaves pip on the index from the base's /etc/pip.conf.
run docker build --network host "${no_cache[@]}" -t "$tag" \
    --build-arg BASE_IMAGE="$base_tag" \
    --build-arg TORCH_SPEC="$torch_spec" \
    --build-arg TORCH_INDEX_URL="$torch_index" \
    --build-arg TORCH_FIND_LINKS="$find_links" \
    --build-arg TORCH_EXPECT="$torch_expect" \
    "$repo"
docker image ls "$tag" --format 'build-offline.sh: built {{.Repository}}:{{.Tag}}, {{.Size}}' >&2
