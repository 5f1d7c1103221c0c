#!/usr/bin/env bash
# Builds the two container images from the committed Dockerfiles, with docker, podman or buildah (no
# daemon needed with the last two):
#
#   rlp-operator:<version>   operator/Dockerfile   the operator (`rlp operator`), no training stack
#   rlp-job:<version>        jobs/Dockerfile       the phase pods (`rlp phase ...`), torch with CUDA
#
# <version> is pyproject.toml's project version. Usage:
#
#   scripts/build-images.sh                          build both (an image whose inputs are unchanged is kept)
#   scripts/build-images.sh operator                 build one of them (operator or job)
#   REGISTRY=registry.example.com/ml scripts/build-images.sh --push
#                                                    tag as REGISTRY/rlp-operator:<version> ... and push
#
# Settings (environment):
#   REGISTRY            prefix of the image names (none: local names); --push pushes there
#   TAG                 image tag (default: the project version)
#   RLP_IMAGE_BUILDER   docker | podman | buildah (default: docker if its daemon answers, else podman,
#                       else buildah; none of them: podman and buildah are installed with apt-get when
#                       running as root on Debian/Ubuntu)
#   RLP_BASE_IMAGES     auto (default): pull the Dockerfiles' base images, and where no registry is
#                       reachable make stand-ins locally; pull: never make stand-ins; stand-in: never pull
#   RLP_TRUST_HOST_CA   1 (default): stand-in bases trust this host's extra CA certificates
#                       (/usr/local/share/ca-certificates), as builds behind a TLS-inspecting proxy need
#   DEBIAN_MIRROR, UBUNTU_MIRROR  apt mirrors for the stand-in bases (defaults: the public ones)
#   RLP_IMAGE_CACHE_DIR where the build keeps its containers.conf and lock (default ~/.cache/rlp-images)
#
# Stand-in bases (no registry reachable): the Dockerfiles' FROM names are made locally and imported under
# the same names, so the Dockerfiles build unchanged. python:3.11.*-slim-bookworm is Debian bookworm
# (minbase + python3, its python linked to /usr/local/bin); nvidia/cuda:*-ubuntu24.04 is Ubuntu noble
# (minbase, unsigned sources as Debian has no Ubuntu keyring: for tests, not for a release);
# ghcr.io/astral-sh/uv is uv's binaries from its PyPI wheel. Each carries the label dev.rlp.stand-in.
#
# A built image carries the label dev.rlp.inputs, a hash of its Dockerfile, its build context (what
# .dockerignore leaves) and its base images; the next run skips an image whose hash is unchanged. With
# podman/buildah a Dockerfile's build stage (the operator's; the job image has none) is tagged
# rlp-<image>-build-stage:<tag> to keep its layer cache, and a replaced build's images are removed.
# Before building, the script checks the free space where the builder keeps its images
# (RLP_IMAGE_MIN_FREE_GB, default 16 for the job image, whose build peaked at 15 GB: a committed layer is
# held about four times over) and stops with what to free if there is less.
# The last lines printed are the images and their sizes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { echo "[build-images] $*" >&2; }
die() { say "error: $*"; exit 1; }

PUSH=0
TARGETS=()
for arg in "$@"; do
    case "$arg" in
        --push) PUSH=1 ;;
        operator | job) TARGETS+=("$arg") ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $arg (see --help)" ;;
    esac
done
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=(operator job)

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
[[ -n "$VERSION" ]] || die "no project version in pyproject.toml"
TAG=${TAG:-$VERSION}
PREFIX=${REGISTRY:+${REGISTRY%/}/}
[[ $PUSH -eq 0 || -n "$PREFIX" ]] || die "--push needs REGISTRY (e.g. REGISTRY=registry.example.com/ml)"
BASE_IMAGES=${RLP_BASE_IMAGES:-auto}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
UBUNTU_MIRROR=${UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}
HOST_CA_DIR=/usr/local/share/ca-certificates
CACHE_DIR=${RLP_IMAGE_CACHE_DIR:-$HOME/.cache/rlp-images}
mkdir -p "$CACHE_DIR"

dockerfile_of() { case "$1" in operator) echo operator/Dockerfile ;; job) echo jobs/Dockerfile ;; esac; }
image_of() { echo "${PREFIX}rlp-$1:${TAG}"; }

apt_install() {
    [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1 \
        || die "$* missing: install them (Debian/Ubuntu: apt-get install $*)"
    say "installing $* with apt-get"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    fi
}

# -- the builder ------------------------------------------------------------------------------------
BUILDER=${RLP_IMAGE_BUILDER:-}
if [[ -z "$BUILDER" ]]; then
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        BUILDER=docker
    elif command -v podman >/dev/null 2>&1; then
        BUILDER=podman
    elif command -v buildah >/dev/null 2>&1; then
        BUILDER=buildah
    else
        apt_install podman buildah runc uidmap
        BUILDER=podman
    fi
fi
case "$BUILDER" in
    docker) command -v docker >/dev/null 2>&1 || die "docker not found" ;;
    podman | buildah) command -v "$BUILDER" >/dev/null 2>&1 || apt_install podman buildah runc uidmap ;;
    *) die "RLP_IMAGE_BUILDER must be docker, podman or buildah" ;;
esac

BUILD_FLAGS=()
if [[ $BUILDER != docker ]]; then
    # runc where installed: crun cannot start containers on hosts with hybrid cgroups (v1 + v2).
    # The containers.conf applies to this script's runs and to whoever sets CONTAINERS_CONF to it
    # (the image tests do), not to the machine's other podman users.
    RUNTIME=$(command -v runc || true)
    {
        echo "# written by scripts/build-images.sh"
        echo "[containers]"
        echo 'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]'
        if [[ -n "$RUNTIME" ]]; then
            echo "[engine]"
            echo "runtime = \"$RUNTIME\""
        fi
    } >"$CACHE_DIR/containers.conf"
    export CONTAINERS_CONF="$CACHE_DIR/containers.conf"
    BUILD_FLAGS=(--format docker --pull=never --layers ${RUNTIME:+--runtime "$RUNTIME"})
fi

# buildah's inspect describes an image by its builder fields, docker's and podman's by the image's own
ID_FIELD=.Id
CONFIG_FIELD=.Config
[[ $BUILDER == buildah ]] && ID_FIELD=.FromImageID CONFIG_FIELD=.OCIv1.Config
image_id() { "$BUILDER" inspect --type image --format "{{$ID_FIELD}}" "$1" 2>/dev/null || true; }
image_label() {
    "$BUILDER" inspect --type image --format "{{index $CONFIG_FIELD.Labels \"$2\"}}" "$1" 2>/dev/null || true
}
image_size() {
    if [[ $BUILDER == buildah ]]; then
        buildah images --format '{{.Size}}' "$1" | head -n 1
    else
        "$BUILDER" image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f MB\n", $1 / 1e6}'
    fi
}

exec 9>"$CACHE_DIR/build.lock"
flock 9  # one build at a time on this machine (concurrent test sessions)

# -- base images -----------------------------------------------------------------------------------
base_images() {  # the FROM names of a Dockerfile that are images, not earlier stages
    awk 'toupper($1) == "FROM" { name = $2; if ($3 ~ /^[Aa][Ss]$/) stage[$4] = 1; if (!(name in stage)) print name }' "$1" \
        | sort -u
}

import_rootfs() {  # tarball name description
    local changes=(--change "LABEL dev.rlp.stand-in=$3")
    if [[ $BUILDER == buildah ]]; then
        local ctr
        ctr=$(buildah from scratch)
        buildah add "$ctr" "$1" / >/dev/null
        buildah config --label "dev.rlp.stand-in=$3" "$ctr"
        buildah commit --quiet --rm "$ctr" "$2" >/dev/null
    else
        "$BUILDER" import --quiet "${changes[@]}" "$1" "$2" >/dev/null
    fi
}

make_stand_in() {  # base image name
    local name=$1 work
    work=$(mktemp -d)
    local hooks=(--customize-hook='mkdir -p "$1/etc/uv" && printf "system-certs = true\n" >"$1/etc/uv/uv.toml"')
    if [[ ${RLP_TRUST_HOST_CA:-1} == 1 ]] && compgen -G "$HOST_CA_DIR/*.crt" >/dev/null; then
        hooks+=(--customize-hook="cp $HOST_CA_DIR/*.crt \"\$1/usr/local/share/ca-certificates/\" && chroot \"\$1\" update-ca-certificates >/dev/null")
    fi
    case "$name" in
        python:3.11*-bookworm)
            command -v mmdebstrap >/dev/null 2>&1 || apt_install mmdebstrap
            hooks+=(--customize-hook='for p in python3 python3.11 python; do ln -sf /usr/bin/python3.11 "$1/usr/local/bin/$p"; done')
            mmdebstrap --quiet --variant=minbase --include=python3,ca-certificates "${hooks[@]}" \
                bookworm "$work/rootfs.tar" "deb $DEBIAN_MIRROR bookworm main" "deb $DEBIAN_MIRROR bookworm-updates main"
            import_rootfs "$work/rootfs.tar" "$name" "Debian bookworm minbase with python3 (stands in for $name)"
            ;;
        nvidia/cuda:*-ubuntu24.04)
            command -v mmdebstrap >/dev/null 2>&1 || apt_install mmdebstrap
            local sources="[trusted=yes] $UBUNTU_MIRROR"
            mmdebstrap --quiet --variant=minbase --include=apt,ca-certificates --components=main,universe "${hooks[@]}" \
                noble "$work/rootfs.tar" "deb $sources noble main universe" "deb $sources noble-updates main universe" \
                "deb $sources noble-security main universe"
            import_rootfs "$work/rootfs.tar" "$name" \
                "Ubuntu noble minbase, unsigned apt sources, no CUDA (stands in for $name; tests only)"
            ;;
        ghcr.io/astral-sh/uv:*)
            local version=${name##*:}
            # uv run exports UV (the uv that runs us), which is off PATH where uv came from `pip --user`;
            # a venv's python3 has no pip, so pip is the last resort.
            local uv_bin=${UV:-$(command -v uv || true)}
            if [[ -n "$uv_bin" ]]; then
                "$uv_bin" pip install --quiet --no-deps --target "$work/wheel" "uv==$version"
            else
                python3 -m pip install --quiet --no-deps --target "$work/wheel" "uv==$version"
            fi
            mkdir "$work/rootfs"
            cp "$work/wheel/bin/uv" "$work/wheel/bin/uvx" "$work/rootfs/"
            tar -C "$work/rootfs" -cf "$work/rootfs.tar" uv uvx
            import_rootfs "$work/rootfs.tar" "$name" "uv and uvx from the uv $version wheel on PyPI (stands in for $name)"
            ;;
        *) die "no registry reachable for $name and no stand-in known for it" ;;
    esac
    rm -rf "$work"
}

ensure_base() {  # base image name
    local name=$1
    [[ -n "$(image_id "$name")" ]] && return 0
    if [[ $BASE_IMAGES != stand-in ]]; then
        say "pulling $name"
        if timeout 600 "$BUILDER" pull --quiet "$name" >/dev/null 2>&1; then
            return 0
        fi
        [[ $BASE_IMAGES == pull ]] && die "could not pull $name"
    fi
    say "making a stand-in for $name (no registry reachable)"
    local t0=$SECONDS
    make_stand_in "$name"
    say "stand-in $name made in $((SECONDS - t0)) s"
}

# -- inputs hash -----------------------------------------------------------------------------------
inputs_hash() {  # dockerfile base-ids...: the Dockerfile, the build context .dockerignore leaves, the bases
    python3 - "$@" <<'EOF'
import fnmatch, hashlib, os, sys
from pathlib import Path

dockerfile, *bases = sys.argv[1:]
patterns = [p.strip().rstrip("/") for p in Path(".dockerignore").read_text().splitlines()
            if p.strip() and not p.startswith("#")]

def ignored(rel: str) -> bool:  # the .dockerignore forms used here: root-relative paths and **/NAME
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p[3:]) if p.startswith("**/") else fnmatch.fnmatch(rel, p) for p in patterns)

digest = hashlib.sha256(Path(dockerfile).read_bytes())
for base in bases:
    digest.update(base.encode())
for root, dirs, files in os.walk("."):
    rel_root = os.path.relpath(root, ".")
    dirs[:] = sorted(d for d in dirs if not ignored(os.path.normpath(os.path.join(rel_root, d))))
    for name in sorted(files):
        rel = os.path.normpath(os.path.join(rel_root, name))
        if not ignored(rel):
            digest.update(rel.encode() + b"\0" + Path(rel).read_bytes() + b"\0")
print(digest.hexdigest()[:32])
EOF
}

# -- build -----------------------------------------------------------------------------------------
# With podman and buildah the layer cache is kept in untagged images: the build stage is tagged
# (rlp-<target>-build-stage) so its cached layers stay reachable, and a replaced build's images are
# removed rather than left dangling (a job image's layers are gigabytes).
remove_replaced() {  # old-id name
    if [[ -n "$1" && "$1" != "$(image_id "$2")" ]]; then
        "$BUILDER" rmi "$1" >/dev/null 2>&1 || true  # unless something still uses it
    fi
}

storage_dir() {  # where the builder writes image layers
    case "$BUILDER" in
        docker) docker info --format '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker ;;
        *) "$BUILDER" info --format '{{.Store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers/storage ;;
    esac
}

check_free_space() {  # target: stop before a build that would fill the disk half-way through
    local need=${RLP_IMAGE_MIN_FREE_GB:-} dir free_gb
    [[ -n "$need" ]] || case "$1" in job) need=16 ;; *) need=2 ;; esac
    dir=$(storage_dir)
    mkdir -p "$dir"
    free_gb=$(df -P --block-size=1G "$dir" | awk 'NR == 2 { print $4 }')
    if (( free_gb < need )); then
        die "building rlp-$1 needs about ${need} GB free in $dir, which has ${free_gb} GB: free space" \
            "(e.g. '$BUILDER image prune', or remove old rlp images) or set RLP_IMAGE_MIN_FREE_GB"
    fi
}

build() {  # target
    local target=$1 dockerfile image ids=() base
    dockerfile=$(dockerfile_of "$target")
    image=$(image_of "$target")
    while read -r base; do
        ensure_base "$base"
        ids+=("$base=$(image_id "$base")")
    done < <(base_images "$dockerfile")
    local hash
    hash=$(inputs_hash "$dockerfile" "${ids[@]}")
    if [[ "$(image_label "$image" dev.rlp.inputs)" == "$hash" ]]; then
        say "$image is up to date (inputs $hash)"
        return 0
    fi
    check_free_space "$target"
    say "building $image from $dockerfile"
    local t0=$SECONDS
    if [[ $BUILDER == docker ]]; then
        docker build --label "dev.rlp.inputs=$hash" -f "$dockerfile" -t "$image" . >&2
    else
        local bud=(podman build) stage="" old_image old_stage=""
        [[ $BUILDER == buildah ]] && bud=(buildah bud)
        old_image=$(image_id "$image")
        if grep -qiE '^FROM[[:space:]].*[[:space:]]AS[[:space:]]+build[[:space:]]*$' "$dockerfile"; then
            stage="rlp-$target-build-stage:$TAG"
            old_stage=$(image_id "$stage")
            "${bud[@]}" "${BUILD_FLAGS[@]}" --target build -f "$dockerfile" -t "$stage" . >&2
        fi
        "${bud[@]}" "${BUILD_FLAGS[@]}" --label "dev.rlp.inputs=$hash" -f "$dockerfile" -t "$image" . >&2
        remove_replaced "$old_image" "$image"
        [[ -z "$stage" ]] || remove_replaced "$old_stage" "$stage"
    fi
    say "built $image in $((SECONDS - t0)) s"
}

for target in "${TARGETS[@]}"; do
    build "$target"
done
if [[ $PUSH -eq 1 ]]; then
    for target in "${TARGETS[@]}"; do
        say "pushing $(image_of "$target")"
        "$BUILDER" push "$(image_of "$target")" >&2
    done
fi
for target in "${TARGETS[@]}"; do
    echo "$(image_of "$target") $(image_size "$(image_of "$target")")"
done
