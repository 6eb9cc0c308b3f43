#!/usr/bin/env bash
# Builds the images compose runs, also where no container registry can be reached:
#   - BASE_IMAGE (default python:3.11-slim) if it can be pulled; else a Debian bookworm base made
#     with debootstrap and `docker import` (whisper-gateway-base:bookworm, kept for next time);
#   - the gateway image (whisper-gateway:$GATEWAY_VERSION) from it, with the host's pip
#     configuration and CA bundle (deploy/pip/), so the build reaches the index as the host does;
#   - etcd for the `ha` profile: $ETCD_IMAGE if it can be pulled, else whisper-gateway-etcd:local
#     from Debian's etcd-server.
# Writes what compose needs to .docker-images.env (BASE_IMAGE, ETCD_IMAGE); run as root (dockerd).
set -euo pipefail
cd "$(dirname "$0")/.."
GATEWAY_VERSION=${GATEWAY_VERSION:-latest}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
ETCD_IMAGE=${ETCD_IMAGE:-quay.io/coreos/etcd:v3.5.17}
LOCAL_BASE=whisper-gateway-base:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

have() { docker image inspect "$1" >/dev/null 2>&1 || timeout 120 docker pull -q "$1" >/dev/null 2>&1; }

local_base() {
  if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null
    root=$(mktemp -d)

    echo "images: no registry for $1; making $LOCAL_BASE with debootstrap (about a minute, once)" >&2
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$DEBIAN_MIRROR" >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import - "$LOCAL_BASE" >/dev/null
  fi
  echo "$LOCAL_BASE"
}

# The host's pip settings, merged (the files pip reads, then PIP_*), with its CA bundle beside them.
python3 - <<'PY'
import configparser, os, shutil
from pathlib import Path
out = Path("deploy/pip")
for stale in out.glob("*"):
    if stale.name != "README.md":
        stale.unlink()
merged = {}
files = ["/etc/pip.conf", "/etc/xdg/pip/pip.conf", os.path.expanduser("~/.config/pip/pip.conf"),
         os.path.expanduser("~/.pip/pip.conf"), os.environ.get("PIP_CONFIG_FILE", "")]
for name in files:
    if name and os.path.isfile(name):
        parser = configparser.RawConfigParser()
        parser.read(name)
        for section in ("global", "install"):
            if parser.has_section(section):
                merged.update(parser.items(section))
merged.update({k[4:].lower().replace("_", "-"): v for k, v in os.environ.items() if k.startswith("PIP_")})
keep = {"index-url", "extra-index-url", "trusted-host", "cert", "timeout", "default-timeout", "retries", "proxy"}
settings = {}
for key, value in merged.items():
    if key not in keep:
        continue
    if key.endswith("index-url"):  # local file:// indexes are not in the build
        value = " ".join(url for url in value.split() if not url.startswith("file:"))
    if value:
        settings[key] = value
bundle = settings.pop("cert", None) or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
if bundle and os.path.isfile(bundle):
    shutil.copyfile(bundle, out / "ca.crt")
    settings["cert"] = "/tmp/host-pip/ca.crt"
if settings:
    (out / "pip.conf").write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(settings.items())))
    print("images: the build uses the host's pip settings:", ", ".join(sorted(settings)))
PY

have "$BASE_IMAGE" || BASE_IMAGE=$(local_base "$BASE_IMAGE")
echo "images: building whisper-gateway:$GATEWAY_VERSION from $BASE_IMAGE"
docker build -q --build-arg BASE_IMAGE="$BASE_IMAGE" -t "whisper-gateway:$GATEWAY_VERSION" . >/dev/null
if ! have "$ETCD_IMAGE"; then
  base=$(local_base "$ETCD_IMAGE")
  ETCD_IMAGE=whisper-gateway-etcd:local
  if ! docker image inspect "$ETCD_IMAGE" >/dev/null 2>&1; then
    echo "images: building $ETCD_IMAGE from Debian's etcd-server"
    printf 'FROM %s\nRUN apt-get update -q && apt-get install -y -q --no-install-recommends etcd-server && rm -rf /var/lib/apt/lists/*\n' \
      "$base" | docker build -q -t "$ETCD_IMAGE" - >/dev/null
  fi
fi
printf 'BASE_IMAGE=%s\nETCD_IMAGE=%s\n' "$BASE_IMAGE" "$ETCD_IMAGE" > .docker-images.env
echo "images: ready (BASE_IMAGE=$BASE_IMAGE, ETCD_IMAGE=$ETCD_IMAGE)"
