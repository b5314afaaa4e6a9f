#!/usr/bin/env bash
# Build the Docker image for real and serve from it, on a machine with no Docker engine and no
# access to an image registry (only Debian mirrors and PyPI):
#   1. a local debian:bookworm-slim base made with debootstrap, tagged with the name the
#      Dockerfile uses (docker.io/library/debian:bookworm-slim);
#   2. `podman build --isolation chroot --format docker` (docker format keeps the HEALTHCHECK);
#   3. the built image is mounted (podman create + podman mount) and its ENTRYPOINT/CMD run with
#      its Env, User and WorkingDir under chroot, in a fresh network namespace with loopback
#      only (no network at run time), since `podman run` is refused by some sandboxes' rlimits;
#   4. /healthz, /readyz and POST /evaluate are called, the image's HEALTHCHECK command is run,
#      SIGTERM must give exit 0, and `gatekeeper audit` must list the decision.
#
#   sudo deploy/verify-image.sh            (root: debootstrap, podman mount and chroot need it)
#   IMAGE=gatekeeper:dev KEEP_BASE=1 deploy/verify-image.sh
# Needs: apt-get install podman debootstrap (Debian bookworm). Run time on 2 cores: see
# README "Operations" (most of it is compiling llama.cpp inside the build).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/gatekeeper:verify}
BASE=${BASE:-docker.io/library/debian:bookworm-slim}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PORT=${PORT:-18080}
# A TLS-intercepting proxy's CA, if the host has one, is given to pip in the build as a secret.
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WORK=$(mktemp -d /tmp/gatekeeper-verify.XXXXXX)
started=$(date +%s)

log() { printf '[verify-image +%4ss] %s\n' "$(($(date +%s) - started))" "$*"; }
die() { log "FAIL: $*"; exit 1; }

for tool in podman debootstrap unshare chroot ip python3 curl; do
  command -v "$tool" >/dev/null || die "missing $tool (apt-get install podman debootstrap iproute2 curl)"
done
[ "$(id -u)" = 0 ] || die "run as root (debootstrap, podman mount and chroot need it)"

# ---- 1. the base image -------------------------------------------------------------------
if podman image exists "$BASE"; then
  log "base $BASE exists"
else
  log "debootstrap bookworm (minbase) from $MIRROR"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; die "debootstrap"; }
  # what the official -slim images leave out: docs, man pages, locales, apt's caches
  cat >"$WORK/rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
CFG
  # and, as they do, apt's downloaded packages are removed after each install
  cat >"$WORK/rootfs/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
  find "$WORK/rootfs/usr/share/doc" -mindepth 2 -not -name copyright -not -type d -delete
  rm -rf "$WORK"/rootfs/usr/share/{man,groff,info,lintian,linda}/* \
    "$WORK"/rootfs/var/lib/apt/lists/* "$WORK"/rootfs/var/cache/apt/archives/*.deb \
    "$WORK"/rootfs/var/cache/apt/*.bin "$WORK"/rootfs/var/log/*.log
  find "$WORK/rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias \
    -exec rm -rf {} +
  tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["bash"]' - "$BASE" >/dev/null
  rm -rf "$WORK/rootfs"
  log "base $BASE imported ($(podman image inspect "$BASE" --format '{{.Size}}') bytes)"
fi

# ---- 2. the build ------------------------------------------------------------------------
secret=()
[ -s "$CA_BUNDLE" ] && secret=(--secret "id=ca_bundle,src=$CA_BUNDLE")
if [ -n "${SKIP_BUILD:-}" ]; then
  log "SKIP_BUILD: serving the existing $IMAGE"
else
  log "podman build $IMAGE (log: $WORK/build.log)"
  build_start=$(date +%s)
  podman build --isolation chroot --format docker --pull=never "${secret[@]}" \
    -t "$IMAGE" -f Dockerfile . >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; die "podman build"; }
  log "built in $(($(date +%s) - build_start)) s"
fi
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
log "image size $size bytes ($((size / 1000000)) MB uncompressed)"

# ---- 3. serve from the mounted image -----------------------------------------------------
config=$(podman image inspect "$IMAGE" --format '{{json .}}')
ctr=$(podman create "$IMAGE")
mnt=$(podman mount "$ctr")
cleanup() {
  set +e
  [ -n "${server_pid:-}" ] && kill -KILL "$server_pid" 2>/dev/null
  for m in dev proc; do umount "$mnt/$m" 2>/dev/null; done
  podman umount "$ctr" >/dev/null 2>&1
  podman rm -f "$ctr" >/dev/null 2>&1
  [ -z "${KEEP_WORK:-}" ] && rm -rf "$WORK"
}
trap cleanup EXIT
mount --bind /proc "$mnt/proc"
mount --bind /dev "$mnt/dev"

# The image's own Env, User, WorkingDir, Entrypoint + Cmd and Healthcheck, as a runtime would.
python3 - "$config" "$PORT" >"$WORK/run.env" <<'PY'
import json, shlex, sys
image = json.loads(sys.argv[1])
image = image[0] if isinstance(image, list) else image
c = image["Config"]
env = [e for e in c.get("Env") or [] if not e.startswith("GATEKEEPER_PORT=")]
env.append(f"GATEKEEPER_PORT={sys.argv[2]}")
print("ENV=(" + " ".join(shlex.quote(e) for e in env) + ")")
print("USER_SPEC=" + shlex.quote(c.get("User") or "0"))
print("WORKDIR=" + shlex.quote(c.get("WorkingDir") or "/"))
print("CMD=(" + " ".join(shlex.quote(a) for a in (c.get("Entrypoint") or []) + (c.get("Cmd") or [])) + ")")
test = (image.get("Healthcheck") or image.get("HealthCheck") or c.get("Healthcheck") or {}).get("Test") or []
print("HEALTH=(" + " ".join(shlex.quote(a) for a in test[1:]) + ")")
print("HEALTH_KIND=" + shlex.quote(test[0] if test else "NONE"))
PY
# shellcheck disable=SC1091
source "$WORK/run.env"
[ "$HEALTH_KIND" != NONE ] || die "the image has no HEALTHCHECK"
uid=$(chroot "$mnt" id -u "$USER_SPEC"); gid=$(chroot "$mnt" id -g "$USER_SPEC")
[ "$uid" != 0 ] || die "the image runs as root"
log "image user $USER_SPEC ($uid:$gid), command: ${CMD[*]}"

exec_in_image() {  # become a command run as the image's user, with the image's environment
  exec chroot --userspec="$uid:$gid" "$mnt" /usr/bin/env -i "${ENV[@]}" HOME="$WORKDIR" \
    sh -c 'cd "$0" && exec "$@"' "$WORKDIR" "$@"
}
in_image() { (exec_in_image "$@"); }
export -f exec_in_image in_image
export mnt uid gid WORKDIR
ENV_DECL=$(declare -p ENV); CMD_DECL=$(declare -p CMD); HEALTH_DECL=$(declare -p HEALTH)
export ENV_DECL CMD_DECL HEALTH_DECL HEALTH_KIND PORT WORK

# Everything below runs in a new network namespace with only loopback: no network at run time.
unshare --net --fork bash -euo pipefail <<'INNER'
eval "$ENV_DECL"; eval "$CMD_DECL"; eval "$HEALTH_DECL"
ip link set lo up
url="http://127.0.0.1:$PORT"
serve_start=$(date +%s)
exec_in_image "${CMD[@]}" >"$WORK/serve.log" 2>&1 &  # $! is the server itself
pid=$!
ready=
for _ in $(seq 1 600); do
  if curl -sS -o "$WORK/readyz.json" -w '%{http_code}' "$url/readyz" 2>/dev/null | grep -q 200; then
    ready=1; break
  fi
  kill -0 "$pid" 2>/dev/null || { tail -30 "$WORK/serve.log"; echo "server died"; exit 1; }
  # nothing left loading and still not ready: a tier failed; no point in waiting
  if [ -s "$WORK/readyz.json" ] && ! grep -q '"loading"' "$WORK/readyz.json"; then
    cat "$WORK/readyz.json"; echo; tail -5 "$WORK/serve.log" | cut -c1-400
    echo "not ready and nothing loading"; exit 1
  fi
  sleep 0.5
done
[ -n "$ready" ] || { echo "not ready in 300 s"; exit 1; }
echo "ready in $(($(date +%s) - serve_start)) s: $(cat "$WORK/readyz.json")"
curl -fsS "$url/healthz"; echo
if [ "$HEALTH_KIND" = CMD-SHELL ]; then in_image sh -c "${HEALTH[*]}"; else in_image "${HEALTH[@]}"; fi
echo "HEALTHCHECK passed"
body='{"request_id": "verify-image-1", "agent": {"id": "verify"}, "goal": "Free disk space.",
       "action": {"tool": "shell", "arguments": {"cmd": "rm -rf /home/*"}}, "explain": false}'
t0=$(date +%s%N)
curl -fsS "$url/evaluate" -H 'content-type: application/json' -d "$body" >"$WORK/evaluate.json"
echo "evaluate in $((($(date +%s%N) - t0) / 1000000)) ms: $(cat "$WORK/evaluate.json")"
python3 - "$WORK/evaluate.json" <<'PY'
import json, sys
a = json.load(open(sys.argv[1]))
assert a["request_id"] == "verify-image-1", a
assert a["decision"] in {"allow", "deny", "revise", "escalate"}, a
assert a["degraded"] is False, f"degraded answer: {a}"
assert a["model"] == "qwen2.5-coder-0.5b-instruct-q4_k_m", a
PY
kill -TERM "$pid"
status=0; wait "$pid" || status=$?
[ "$status" = 0 ] || { tail -20 "$WORK/serve.log"; echo "exit status $status after SIGTERM"; exit 1; }
echo "SIGTERM: exit 0"
in_image gatekeeper audit --request-id verify-image-1 | tee "$WORK/audit.txt"
grep -q verify-image-1 "$WORK/audit.txt" || { echo "decision missing from the audit log"; exit 1; }
INNER
log "PASS: $IMAGE (size $((size / 1000000)) MB) builds, serves /readyz and /evaluate offline, drains on SIGTERM"
