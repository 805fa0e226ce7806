#!/usr/bin/env bash
# Builds the service's container images with one command: with Docker when a Docker engine
# answers (`docker info`), else with podman. The image names are the same either way.
#
#   scripts/image.sh                                   # runtime target -> rottenbot-inference:local
#   scripts/image.sh --target with-model --model DIR   # a Keras/MLflow model baked in, converted at
#                                                      # build -> rottenbot-inference:with-model
#   scripts/image.sh --target keras                    # + TensorFlow -> rottenbot-inference:keras
#   scripts/image.sh --standins                        # podman: the compose stand-ins for
#                                                      # third-party images (deploy/standins)
#   eval "$(scripts/image.sh --print-env)"             # podman / podman-compose with the same config
#
# Options: --target T, --tag NAME, --model DIR, --base auto|registry|debian, --engine docker|podman,
# --rebuild-base, --standins. Environment: ROTTENBOT_ENGINE, ROTTENBOT_BASE, ROTTENBOT_PODMAN_DIR (config and
# image storage; default /var/tmp/rottenbot-podman as root, $XDG_DATA_HOME/rottenbot-podman else).
#
# podman: its configuration lives in its own folder (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF), the
# host's is never read or edited: OCI runtime runc, cgroupfs, file events, overlay storage, and
# default ulimits nofile/nproc 16384 (a VM's hard limits may be lower than podman's defaults). When
# no registry answers (`--base auto` tries one pull), the Python base image is built from Debian
# packages with mmdebstrap and imported once: later builds reuse it. podman, buildah, runc,
# slirp4netns, uidmap, mmdebstrap and CNI's dnsname plugin are installed with apt-get when
# missing. The host's CA bundle is bind-mounted into podman build steps (never copied into an
# image) for HTTPS through a proxy.
set -euo pipefail
cd "$(dirname "$0")/.."

target=runtime tag="" model="" base="${ROTTENBOT_BASE:-auto}" engine="${ROTTENBOT_ENGINE:-}"
print_env=false rebuild_base=false standins=false
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    --engine) engine="$2"; shift 2 ;;
    --rebuild-base) rebuild_base=true; shift ;;
    --print-env) print_env=true; shift ;;
    --standins) standins=true; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "image.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

case "$target" in
  runtime) default_tag=rottenbot-inference:local ;;
  with-model) default_tag=rottenbot-inference:with-model ;;
  keras) default_tag=rottenbot-inference:keras ;;
  *) echo "image.sh: --target must be runtime, with-model or keras" >&2; exit 2 ;;
esac
tag="${tag:-$default_tag}"
if [ "$target" = with-model ] && [ ! -d "$model" ]; then
  echo "image.sh: --target with-model needs --model DIR (a Keras or MLflow model folder)" >&2
  exit 2
fi

REGISTRY_PYTHON=docker.io/library/python:3.11-slim-bookworm
# The recipe number in the tag: a changed recipe builds a new base instead of reusing the old.
DEBIAN_PYTHON=localhost/rottenbot-python:3.11-bookworm-r2
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
log() { echo "image.sh: $*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- podman's own configuration --------------------------------------------------------------
podman_config() {
  local dir run
  if [ "$(id -u)" -eq 0 ]; then
    dir="${ROTTENBOT_PODMAN_DIR:-/var/tmp/rottenbot-podman}"
    run="/run/rottenbot-podman"
    # Another storage folder gets its own run folder: two stores must never share a runroot.
    [ "$dir" = /var/tmp/rottenbot-podman ] || run="$run-$(printf %s "$dir" | md5sum | cut -c1-8)"
  else
    dir="${ROTTENBOT_PODMAN_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/rottenbot-podman}"
    run="${XDG_RUNTIME_DIR:-/tmp}/rottenbot-podman-$(id -u)"
  fi
  mkdir -p "$dir/cni" "$run"
  # Written every time (cheap): the folder stays consistent with this script.
  cat >"$dir/storage.conf" <<EOF
# Written by scripts/image.sh: podman/buildah storage for RottenBot images.
[storage]
driver = "overlay"
graphroot = "$dir/storage"
runroot = "$run/storage"
EOF
  cat >"$dir/containers.conf" <<EOF
# Written by scripts/image.sh (see its header for why each setting).
[containers]
default_ulimits = ["nofile=16384:16384", "nproc=16384:16384"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$run/libpod"

[network]
network_backend = "cni"
network_config_dir = "$dir/cni"
EOF
  export CONTAINERS_STORAGE_CONF="$dir/storage.conf" CONTAINERS_CONF="$dir/containers.conf"
}

install_podman() {
  local missing=() cmd
  for cmd in podman buildah runc slirp4netns newuidmap mmdebstrap; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  # Compose service names resolve through CNI's dnsname plugin.
  [ -e /usr/lib/cni/dnsname ] || missing+=(dnsname)
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || { log "missing ${missing[*]} and no apt-get"; return 1; }
  log "installing podman buildah runc slirp4netns uidmap mmdebstrap (missing: ${missing[*]})"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
    podman buildah runc slirp4netns uidmap mmdebstrap \
    golang-github-containernetworking-plugin-dnsname >/dev/null
}

# The Debian mirror this machine's apt uses (deb822 sources first, then sources.list).
debian_mirror() {
  local uri=""
  if [ -r /etc/apt/sources.list.d/debian.sources ]; then
    uri="$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
  fi
  if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
    uri="$(awk '$1 == "deb" && $0 ~ /debian/ && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list)"
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

# Python 3.11 on Debian bookworm, minbase, merged /usr set up by mmdebstrap's hook (else the
# usrmerge package pulls in all of Perl, ~50 MB), no docs, man pages, locales or iconv modules
# (Python has its own codecs): the registry-free base.
build_debian_base() {
  if ! $rebuild_base && podman image exists "$DEBIAN_PYTHON"; then
    log "base $DEBIAN_PYTHON exists: reused"
    return 0
  fi
  local mirror start
  mirror="$(debian_mirror)"
  start=$SECONDS
  log "building base $DEBIAN_PYTHON from Debian packages ($mirror)"
  mmdebstrap --quiet --variant=minbase \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/lib/*/gconv/*' \
    bookworm - "$mirror" \
    | podman import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["python3"]' \
      - "$DEBIAN_PYTHON" >/dev/null
  log "base built in $((SECONDS - start)) s"
}

# Which Python base the build uses: the registry's slim image when it can be had, else Debian's.
choose_base() {
  case "$base" in
    registry) echo "$REGISTRY_PYTHON"; return ;;
    debian) build_debian_base; echo "$DEBIAN_PYTHON"; return ;;
    auto) ;;
    *) log "--base must be auto, registry or debian"; exit 2 ;;
  esac
  if podman image exists "$REGISTRY_PYTHON" \
    || timeout 60 podman pull -q "$REGISTRY_PYTHON" >/dev/null 2>&1; then
    echo "$REGISTRY_PYTHON"
  else
    log "no registry answered for $REGISTRY_PYTHON: using the Debian base"
    build_debian_base
    echo "$DEBIAN_PYTHON"
  fi
}

# --- engine ----------------------------------------------------------------------------------
if [ -z "$engine" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    engine=docker
  else
    engine=podman
  fi
fi

if $print_env; then
  podman_config
  echo "export CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF"
  echo "export CONTAINERS_CONF=$CONTAINERS_CONF"
  exit 0
fi

start=$SECONDS
ca_mount=()
[ -r "$CA_BUNDLE" ] && ca_mount=(-v "$CA_BUNDLE:$CA_BUNDLE:ro")

# Stand-ins for docker-compose.yaml's third-party images, on the Debian base (podman only).
if $standins; then
  podman_config
  install_podman
  build_debian_base
  for part in postgres redis prometheus python; do
    log "podman build stand-in $part -> localhost/rottenbot-standin-$part:1"
    podman build --format docker --network host --layers "${ca_mount[@]}" \
      --build-arg "BASE=$DEBIAN_PYTHON" --build-context locks=requirements \
      --target "$part" -t "localhost/rottenbot-standin-$part:1" \
      -f deploy/standins/Containerfile deploy/standins
  done
  log "stand-ins built in $((SECONDS - start)) s"
  exit 0
fi

args=(--target "$target" -t "$tag" -f Dockerfile)
[ "$target" = with-model ] && args+=(--build-context "model=$model")

if [ "$engine" = docker ]; then
  [ "$base" = debian ] && log "--base debian is for podman; Docker pulls the registry's base"
  DOCKER_BUILDKIT=1 docker build "${args[@]}" .
  size="$(docker image inspect -f '{{.Size}}' "$tag")"
else
  podman_config
  install_podman
  python_image="$(choose_base)"
  log "podman build $target -> $tag on $python_image"
  podman build --format docker --network host --layers "${ca_mount[@]}" \
    --build-arg "PYTHON_IMAGE=$python_image" "${args[@]}" .
  size="$(podman image inspect -f '{{.Size}}' "$tag")"
fi
log "built $tag with $engine in $((SECONDS - start)) s, $((size / 1000000)) MB"
