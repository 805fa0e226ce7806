#!/usr/bin/env bash
# Installs everything the tests need (Python packages, redis-server, PostgreSQL, Chromium for the
# docs page test) and runs them all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Containers (tests/test_container.py, tests/test_compose_stack.py): podman and what it needs
# here (scripts/image.sh, docs/containers.md). A failed install stops the run only under CI=true;
# elsewhere those tests skip and say why, and everything else still runs.
container_pkgs=()
for pair in podman:podman buildah:buildah runc:runc slirp4netns:slirp4netns newuidmap:uidmap \
            mmdebstrap:mmdebstrap; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || container_pkgs+=("${pair#*:}")
done
[ -e /usr/lib/cni/dnsname ] || container_pkgs+=(golang-github-containernetworking-plugin-dnsname)
if [ ${#container_pkgs[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
           --no-install-recommends "${container_pkgs[@]}" >/dev/null; }; then
    case "${CI:-}" in
      1|true|TRUE|True|yes) echo "test.sh: could not install ${container_pkgs[*]}" >&2; exit 1 ;;
      *) echo "test.sh: could not install ${container_pkgs[*]}: container tests will skip" >&2 ;;
    esac
  fi
fi

export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest "$@"
