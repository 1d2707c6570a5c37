#!/usr/bin/env bash
# PostgreSQL for zenlm's storage tests: install it from Debian's packages when missing, start a
# private cluster on 127.0.0.1 (its own data folder and port, trust auth, nothing else touched),
# make a user and a database, and print the URL for ZENLM_TEST_POSTGRES_URL. Safe to run again.
set -euo pipefail
PORT="${ZENLM_PG_PORT:-55432}"
DATA="${ZENLM_PG_DATA:-${TMPDIR:-/tmp}/zenlm-postgres}"
USER_NAME=zenlm
DB_NAME=zenlm_test

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
fi
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"

# the server refuses to run as root: run it as the postgres user the package creates
id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ ! -f "$DATA/PG_VERSION" ]; then
    mkdir -p "$DATA"
    [ "$(id -u)" = 0 ] && chown postgres "$DATA"
    as_pg "$BIN/initdb" -D "$DATA" -A trust -U postgres >/dev/null
fi
if ! as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    as_pg "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA -c max_connections=200 -c fsync=off" start >/dev/null
fi
psql_() { psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtAc "$1"; }
[ "$(psql_ "select 1 from pg_roles where rolname = '$USER_NAME'")" = 1 ] || \
    psql_ "create user $USER_NAME password '$USER_NAME'" >/dev/null
[ "$(psql_ "select 1 from pg_database where datname = '$DB_NAME'")" = 1 ] || \
    psql_ "create database $DB_NAME owner $USER_NAME" >/dev/null
echo "postgresql://$USER_NAME:$USER_NAME@127.0.0.1:$PORT/$DB_NAME"
