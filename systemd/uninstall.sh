#!/bin/sh
# Remove edge-agent's service and program; keep its config and buffered events unless --purge.
#
#   sudo ./systemd/uninstall.sh            # or: sudo /opt/edge-agent/share/uninstall.sh
#   sudo ./systemd/uninstall.sh --purge
#
# Always: stops and disables edge-agent.service, removes the unit, /opt/edge-agent and the polkit
# rule /etc/polkit-1/rules.d/50-edge-agent.rules.
# Kept (a reinstall picks them up again): /etc/edge-agent (site.yaml, secrets), the unit's
# drop-ins (/etc/systemd/system/edge-agent.service.d), /var/lib/edge-agent (the buffer: it may
# hold events not yet delivered) and the user edge-agent.
#
# Options:
#   --purge     also delete /etc/edge-agent, /var/lib/edge-agent, the drop-ins, and the user and
#               group edge-agent; first prints how many events are still buffered (they are lost)
#   --root DIR  act on a target root (see install.sh --root): no systemctl, no userdel (the
#               user is removed from DIR/etc/passwd, group, shadow, gshadow)
set -eu

PROG=uninstall
OPT=/opt/edge-agent
ETC=/etc/edge-agent
STATE=/var/lib/edge-agent
UNIT_DIR=/etc/systemd/system
UNIT=edge-agent.service
USER_NAME=edge-agent

say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: WARNING: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -eu/p' "$0" | sed -e '/^set -eu/d' -e 's/^# \{0,1\}//'; exit "${1:-0}"; }

PURGE=0
ROOT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --purge) PURGE=1; shift ;;
    --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
    --root=*) ROOT=${1#*=}; shift ;;
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

systemd_running() {
  [ "$ROOT_MODE" = 0 ] && [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]
}

# ---- 1. stop and disable (before anything is counted or removed) ----------------------------
if systemd_running; then
  if systemctl cat "$UNIT" >/dev/null 2>&1; then
    systemctl disable --now --quiet "$UNIT" || warn "could not stop/disable $UNIT"
    say "stopped and disabled $UNIT"
  fi
fi

# ---- 2. --purge: say what is about to be lost -----------------------------------------------
BUFFER=$ROOT$STATE/buffer.db
if [ "$PURGE" = 1 ] && [ -f "$BUFFER" ]; then
  # The venv's Python while it still exists, else the system's (both have sqlite3; no sqlite3 CLI needed).
  PYBIN=python3
  if "$ROOT$OPT/venv/bin/python" -c '' >/dev/null 2>&1; then PYBIN=$ROOT$OPT/venv/bin/python; fi
  COUNT=$("$PYBIN" - "$BUFFER" <<'EOF' 2>/dev/null || echo "?"
import sqlite3
import sys

con = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
# outbox: the agent's buffer of events not yet acknowledged by the broker (agent/store/outbox.py).
table = next((t for t in ("outbox", "events") if t in tables), None)
print(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] if table else 0)
EOF
)
  if [ "$COUNT" = "?" ]; then
    warn "could not read $STATE/buffer.db: it may still hold events not yet delivered; deleting it"
  elif [ "$COUNT" = 0 ]; then
    say "$STATE/buffer.db holds no undelivered events"
  else
    warn "$STATE/buffer.db still holds $COUNT undelivered event(s); they are deleted now"
  fi
fi

# ---- 3. the unit and the program ------------------------------------------------------------
removed=0
for f in "$ROOT$UNIT_DIR/$UNIT" "$ROOT$UNIT_DIR"/*.wants/"$UNIT"; do
  if [ -e "$f" ] || [ -L "$f" ]; then rm -f "$f"; removed=1; fi
done
[ "$removed" = 0 ] || say "removed $UNIT_DIR/$UNIT"
# The polkit rule goes with the program: it names a user that may be gone.
RULE=/etc/polkit-1/rules.d/50-edge-agent.rules
if [ -e "$ROOT$RULE" ]; then rm -f "$ROOT$RULE"; say "removed $RULE"; fi
if [ "$PURGE" = 1 ] && [ -d "$ROOT$UNIT_DIR/$UNIT.d" ]; then
  rm -rf "$ROOT$UNIT_DIR/$UNIT.d"
  say "removed the drop-ins $UNIT_DIR/$UNIT.d"
fi
if systemd_running; then
  systemctl daemon-reload
  systemctl reset-failed "$UNIT" >/dev/null 2>&1 || true
fi
if [ -d "$ROOT$OPT" ]; then
  rm -rf "$ROOT$OPT"
  say "removed $OPT"
fi

# ---- 4. data and user: only with --purge ----------------------------------------------------
if [ "$PURGE" = 0 ]; then
  kept=""
  for d in "$ETC" "$STATE" "$UNIT_DIR/$UNIT.d"; do [ ! -e "$ROOT$d" ] || kept="$kept $d"; done
  [ -z "$kept" ] || say "kept:$kept and the user $USER_NAME (remove them with --purge)"
  exit 0
fi
for d in "$ETC" "$STATE"; do
  if [ -e "$ROOT$d" ]; then rm -rf -- "$ROOT$d"; say "removed $d"; fi
done

drop_user() {  # drop_user FILE: delete edge-agent's line and its membership of other groups
  [ -f "$1" ] || return 0
  awk -F: -v OFS=: -v u="$USER_NAME" -v members="$2" '
    $1 == u { next }
    members != "" && NF >= members { n = split($members, m, ","); out = ""
      for (i = 1; i <= n; i++) if (m[i] != u) out = (out == "" ? m[i] : out "," m[i])
      $members = out }
    { print }' "$1" > "$1.edge-agent-tmp"
  cat "$1.edge-agent-tmp" > "$1" && rm -f "$1.edge-agent-tmp"   # keeps the file's mode and owner
}
if [ "$ROOT_MODE" = 0 ]; then
  if getent passwd "$USER_NAME" >/dev/null; then
    userdel "$USER_NAME"
    say "removed user $USER_NAME"
  fi
  if getent group "$USER_NAME" >/dev/null; then
    groupdel "$USER_NAME"
  fi
elif grep -qs "^$USER_NAME:" "$ROOT/etc/passwd" "$ROOT/etc/group"; then
  drop_user "$ROOT/etc/passwd" ""
  drop_user "$ROOT/etc/shadow" ""
  drop_user "$ROOT/etc/group" 4
  drop_user "$ROOT/etc/gshadow" 4
  say "removed user $USER_NAME from $ROOT/etc"
fi
