#!/usr/bin/env bash
# Install (if absent) and start PostgreSQL on loopback for the multi-worker sweep tests.
# Prints the server's SQLAlchemy URL on its last line; tests read it from FLAME_KD_TEST_POSTGRES.
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
PGDATA=${FLAME_KD_PGDATA:-/tmp/flame-kd-pg}
PORT=${FLAME_KD_PGPORT:-55432}
if ! "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
  rm -rf "$PGDATA"; mkdir -p "$PGDATA"; chown postgres:postgres "$PGDATA"
  su postgres -c "$BIN/initdb -D $PGDATA -A trust -U postgres" >/dev/null
  su postgres -c "$BIN/pg_ctl -D $PGDATA -o '-c listen_addresses=127.0.0.1 -p $PORT -k /tmp' -l $PGDATA/server.log -w start" >/dev/null
fi
echo "postgresql+psycopg2://postgres@127.0.0.1:$PORT/postgres"
