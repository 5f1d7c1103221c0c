#!/usr/bin/env bash
# Builds the real servers the test suite runs, from Go modules only (no release downloads):
#   kube-apiserver, kube-controller-manager, kube-scheduler  (k8s.io/kubernetes, via tools/testbin)
#   etcd                                                     (go.etcd.io/etcd/server/v3, via tools/testbin)
#   kwok (+ its stage files), versitygw, helm, promtool      (go install <module>@<version>)
#
# Output goes to a cache OUTSIDE the work tree, keyed by the pinned versions:
#   ${RLP_TESTBIN_DIR:-$HOME/.cache/rlp-testbin}/<key>/bin
# A binary already present there is not rebuilt, so a second run is a no-op. Every binary is built
# under a temporary name and renamed into place, so an interrupted run leaves nothing half-written.
# Progress goes to stderr; the last line on stdout is the bin directory.
#
# Environment: RLP_TESTBIN_DIR (cache root), RLP_GO (the go command), RLP_BUILD_JOBS (go build -p, default 2),
# RLP_BUILD_QUIET=1 (say nothing on stderr unless something has to be built), RLP_GO_CACHES=keep (build with
# go's own caches, kept; default: temporary ones, removed at the end).
set -euo pipefail

K8S_VERSION=1.36.3          # k8s.io/kubernetes; staging modules at v0.36.3 (tools/testbin/go.mod)
ETCD_VERSION=3.6.8          # the etcd kubernetes 1.36.3 requires (tools/testbin/go.mod)
KWOK_VERSION=0.8.0
VERSITYGW_VERSION=1.8.0
HELM_VERSION=4.3.1
PROMETHEUS_VERSION=0.316.0  # Go module version of github.com/prometheus/prometheus (promtool only)
GO_TOOLCHAIN=go1.26.8       # fetched as a Go module (golang.org/toolchain) when the installed go is older than 1.26

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KEY="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_versitygw-${VERSITYGW_VERSION}_helm-${HELM_VERSION}_prom-${PROMETHEUS_VERSION}"
CACHE="${RLP_TESTBIN_DIR:-$HOME/.cache/rlp-testbin}/${KEY}"
BIN="${CACHE}/bin"
STAGES="${CACHE}/stages"
JOBS="${RLP_BUILD_JOBS:-2}"

QUIET="${RLP_BUILD_QUIET:-0}"
BUILT=0
log() { printf '[build-test-servers] %s\n' "$*" >&2; }
info() { [[ "$QUIET" == 1 && "$BUILT" == 0 ]] || log "$@"; }  # progress that is noise on a cached run

find_go() {
    if [[ -n "${RLP_GO:-}" ]]; then echo "$RLP_GO"; return; fi
    if command -v go >/dev/null 2>&1; then command -v go; return; fi
    if [[ -x /usr/local/go/bin/go ]]; then echo /usr/local/go/bin/go; return; fi
    # No Go at all: take Debian's (1.19 on bookworm), only to fetch the pinned toolchain below.
    log "no go command found; installing Debian's golang-go"
    local sudo=""
    [[ "$(id -u)" == 0 ]] || sudo="sudo"
    $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq golang-go >&2
    command -v go
}

go_minor() { GOTOOLCHAIN=local "$1" env GOVERSION 2>/dev/null | sed -n 's/^go1\.\([0-9]*\).*/\1/p'; }

# The pinned Go toolchain is itself a Go module (golang.org/toolchain): any go can download it from the
# module proxy, even one too old to switch toolchains by itself (Go < 1.21). Kept beside the binaries.
fetch_toolchain() {
    local old_go="$1" dest="${RLP_TESTBIN_DIR:-$HOME/.cache/rlp-testbin}/${GO_TOOLCHAIN}"
    if [[ ! -x "${dest}/bin/go" ]]; then
        local mod="golang.org/toolchain@v0.0.1-${GO_TOOLCHAIN}.$("$old_go" env GOHOSTOS)-$("$old_go" env GOHOSTARCH)"
        log "fetching the ${GO_TOOLCHAIN} toolchain (module ${mod}) with $("$old_go" version)"
        local dir
        dir="$(cd "$(mktemp -d)" && GOTOOLCHAIN=local GOFLAGS=-mod=mod "$old_go" mod download -json "$mod" \
            | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
        [[ -x "${dir}/bin/go" || -f "${dir}/bin/go" ]] || { log "could not download ${mod}"; exit 1; }
        rm -rf "${dest}.tmp.$$"
        cp -R "$dir" "${dest}.tmp.$$"
        chmod -R u+w "${dest}.tmp.$$"
        chmod +x "${dest}.tmp.$$"/bin/* "${dest}.tmp.$$"/pkg/tool/*/*
        rm -rf "$dest"
        mv "${dest}.tmp.$$" "$dest"
    fi
    echo "${dest}/bin/go"
}

GO="$(find_go)"
minor="$(go_minor "$GO")"
if [[ -z "$minor" || "$minor" -lt 26 ]]; then
    GO="$(fetch_toolchain "$GO")"
fi
export CGO_ENABLED=0 GOFLAGS="-buildvcs=false" GOTOOLCHAIN=local
# The build's Go caches (module downloads, about 3 GB; compiled packages, about 6 GB) are its own and go
# when it ends: the binaries are what is kept, and the disk must still hold the job image's build
# (scripts/build-images.sh). RLP_GO_CACHES=keep builds with go's usual caches instead.
if [[ "${RLP_GO_CACHES:-temporary}" != keep ]]; then
    mkdir -p "$CACHE"
    GO_TMP="$(mktemp -d "${CACHE}/.go-caches.XXXXXX")"
    export GOCACHE="${GO_TMP}/build" GOMODCACHE="${GO_TMP}/mod"
    trap 'chmod -R u+w "$GO_TMP" 2>/dev/null; rm -rf "$GO_TMP"' EXIT  # module files are read-only
fi
info "go: $("$GO" version)"

mkdir -p "$BIN" "$STAGES"

# One build at a time per cache directory, even from concurrent test sessions.
exec 9>"${CACHE}/.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

have() { [[ -x "${BIN}/$1" ]]; }

# install_into NAME CMD... : runs CMD with $OUTFILE set to a temporary path, then renames it to bin/NAME.
install_into() {
    local name="$1"; shift
    if have "$name"; then info "$name: cached"; return; fi
    BUILT=1
    local tmp="${BIN}/.${name}.tmp.$$"
    rm -f "$tmp"
    local t0=$SECONDS
    log "$name: building"
    OUTFILE="$tmp" "$@"
    chmod +x "$tmp"
    mv -f "$tmp" "${BIN}/${name}"
    log "$name: built in $((SECONDS - t0)) s"
}

# Stamp the kube binaries with their real version (as kubernetes' own build does), so clients such as
# helm that read the server version see v1.36.3 rather than v0.0.0-master.
K8S_LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    K8S_LDFLAGS+=" -X ${pkg}.gitVersion=v${K8S_VERSION}"
    K8S_LDFLAGS+=" -X ${pkg}.gitMajor=${K8S_VERSION%%.*}"
    minor="${K8S_VERSION#*.}"; K8S_LDFLAGS+=" -X ${pkg}.gitMinor=${minor%%.*}"
    K8S_LDFLAGS+=" -X ${pkg}.gitTreeState=clean"
    K8S_LDFLAGS+=" -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
done

wrapper_build() {  # PACKAGE (built in tools/testbin, whose go.mod/go.sum pin everything)
    (cd "${ROOT}/tools/testbin" && "$GO" build -p "$JOBS" -trimpath -ldflags "$K8S_LDFLAGS" -o "$OUTFILE" "$1")
}

go_install() {  # MODULE_PATH/cmd/X@VERSION [EXTRA_LDFLAGS]
    local gobin="${BIN}/.gobin.$$"
    rm -rf "$gobin"; mkdir -p "$gobin"
    (cd "$CACHE" && GOBIN="$gobin" "$GO" install -p "$JOBS" -trimpath -ldflags "-s -w ${2:-}" "$1")
    local built=("$gobin"/*)
    mv -f "${built[0]}" "$OUTFILE"
    rm -rf "$gobin"
}

T_START=$SECONDS
install_into etcd wrapper_build ./cmd/etcd
install_into kube-apiserver wrapper_build k8s.io/kubernetes/cmd/kube-apiserver
install_into kube-controller-manager wrapper_build k8s.io/kubernetes/cmd/kube-controller-manager
install_into kube-scheduler wrapper_build k8s.io/kubernetes/cmd/kube-scheduler
install_into kwok go_install "sigs.k8s.io/kwok/cmd/kwok@v${KWOK_VERSION}"
install_into versitygw go_install "github.com/versity/versitygw/cmd/versitygw@v${VERSITYGW_VERSION}"
install_into helm go_install "helm.sh/helm/v4/cmd/helm@v${HELM_VERSION}" \
    "-X helm.sh/helm/v4/internal/version.version=v${HELM_VERSION}"
install_into promtool go_install "github.com/prometheus/prometheus/cmd/promtool@v${PROMETHEUS_VERSION}"

# kwok's stock stages, from its module in the module cache (downloaded by the go install above).
STAGE_FILES=(node/fast/node-initialize.yaml pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml)
missing=0
for f in "${STAGE_FILES[@]}"; do [[ -s "${STAGES}/${f}" ]] || missing=1; done
if (( missing )); then
    kwok_dir="$(cd "$CACHE" && "$GO" mod download -json "sigs.k8s.io/kwok@v${KWOK_VERSION}" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [[ -d "$kwok_dir" ]] || { log "kwok module directory not found"; exit 1; }
    for f in "${STAGE_FILES[@]}"; do
        mkdir -p "$(dirname "${STAGES}/${f}")"
        cp "${kwok_dir}/kustomize/stage/${f}" "${STAGES}/${f}.tmp.$$"
        chmod 644 "${STAGES}/${f}.tmp.$$"
        mv -f "${STAGES}/${f}.tmp.$$" "${STAGES}/${f}"
    done
    BUILT=1
    log "kwok stages copied to ${STAGES}"
fi

info "all binaries ready in ${BIN} ($((SECONDS - T_START)) s)"
echo "$BIN"
