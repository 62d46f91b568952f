#!/usr/bin/env bash
# CI entry point for the O2C Credit Cloud workspace: ensures PostgreSQL and
# Redis are up, then runs fmt, clippy, buf lint and the workspace tests.
set -euo pipefail

cd "$(dirname "$0")/.."
SECONDS=0
trap 'echo "==> Total elapsed: ${SECONDS}s"' EXIT

PG_HOST=127.0.0.1 PG_PORT=5432
REDIS_HOST=127.0.0.1 REDIS_PORT=6379
WAIT_SECS=30
APT_UPDATED=0

step() { printf '\n==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }
is_root() { [ "$(id -u)" -eq 0 ]; }

# Run a command as root: directly when root, else via passwordless sudo.
as_root() {
  if is_root; then "$@"; elif have sudo; then sudo -n "$@"; else return 1; fi
}

apt_install() {
  is_root && have apt-get || return 1
  if [ "$APT_UPDATED" -eq 0 ]; then apt-get update && APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

tcp_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

pg_up() {
  if have pg_isready; then pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; else tcp_open "$PG_HOST" "$PG_PORT"; fi
}

redis_up() {
  if have redis-cli; then
    [ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]
  else tcp_open "$REDIS_HOST" "$REDIS_PORT"; fi
}

# wait_for <name> <check-function>: poll until the check passes or WAIT_SECS elapse.
wait_for() {
  local name=$1 check=$2 deadline=$((SECONDS + WAIT_SECS))
  until "$check"; do
    if [ "$SECONDS" -ge "$deadline" ]; then warn "$name not reachable after ${WAIT_SECS}s"; return 1; fi
    sleep 1
  done
  echo "$name is reachable"
}

pg_versions() { ls /etc/postgresql 2>/dev/null || true; }

start_postgres() {
  local v started=0
  if have pg_ctlcluster; then
    for v in $(pg_versions); do
      as_root pg_ctlcluster --skip-systemctl-redirect "$v" main start && started=1 || true
    done
  fi
  [ "$started" -eq 1 ] || as_root service postgresql start || true
}

# Put a 127.0.0.1 trust rule at the top of each cluster's pg_hba.conf if needed.
ensure_pg_trust() {
  have psql && is_root || return 0
  psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -w -c 'select 1' >/dev/null 2>&1 && return 0
  local v hba rule='host all all 127.0.0.1/32 trust'
  for v in $(pg_versions); do
    hba=/etc/postgresql/$v/main/pg_hba.conf
    [ -f "$hba" ] || continue
    grep -qxF "$rule" "$hba" || sed -i "1i $rule" "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$v" main reload || true
  done
}

ensure_postgres() {
  if pg_up; then echo "PostgreSQL is reachable"; ensure_pg_trust; return 0; fi
  if ! have pg_ctlcluster && ! have postgres && [ -z "$(pg_versions)" ]; then
    if ! apt_install postgresql; then
      warn "PostgreSQL is not installed and cannot be installed (not root?); DB tests will fail under CI=true"
      return 0
    fi
  fi
  start_postgres
  wait_for PostgreSQL pg_up || return 0
  ensure_pg_trust
}

start_redis() {
  local opts=(--daemonize yes --port "$REDIS_PORT" --save "" --appendonly no
    --dir /tmp --logfile /tmp/o2c-redis-test.log)
  redis-server "${opts[@]}" --bind 127.0.0.1 -::1 || redis-server "${opts[@]}" --bind 127.0.0.1
}

ensure_redis() {
  if redis_up; then echo "Redis is reachable"; return 0; fi
  if ! have redis-server && ! apt_install redis-server; then
    warn "Redis is not installed and cannot be installed (not root?); Redis tests will fail under CI=true"
    return 0
  fi
  start_redis || warn "redis-server failed to start"
  wait_for Redis redis_up || true
}

step "Ensuring build tools"
if ! have cc; then apt_install build-essential pkg-config || warn "cc not found and could not install build-essential"; fi

step "Ensuring PostgreSQL at $PG_HOST:$PG_PORT"
ensure_postgres

step "Ensuring Redis at $REDIS_HOST:$REDIS_PORT"
ensure_redis

export O2C_TEST_POSTGRES_URL="${O2C_TEST_POSTGRES_URL:-postgres://postgres@$PG_HOST:$PG_PORT/postgres}"
export O2C_TEST_REDIS_URL="${O2C_TEST_REDIS_URL:-redis://$REDIS_HOST:$REDIS_PORT}"
echo "O2C_TEST_POSTGRES_URL=$O2C_TEST_POSTGRES_URL"
echo "O2C_TEST_REDIS_URL=$O2C_TEST_REDIS_URL"
# The services above were just ensured: a test that cannot reach them must
# fail, not skip (set CI=false to let such tests skip instead).
export CI="${CI:-true}"
echo "CI=$CI"

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets --locked -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "buf lint proto"
if ! have npx; then apt_install npm || true; fi
if have npx; then
  npx --yes @bufbuild/buf@1.75.0 lint proto
else
  warn "npx not available; buf lint was skipped"
fi

step "cargo test --workspace --locked"
cargo test --workspace --locked

step "All checks passed"
