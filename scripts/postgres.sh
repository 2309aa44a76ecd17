#!/usr/bin/env bash
# Starts a local PostgreSQL server for the coordinator's PostgreSQL tests, installing it from Debian's
# packages if needed, and prints the line to export:
#
#   eval "$(scripts/postgres.sh)"     # sets AGORA_TEST_POSTGRES_URL=postgres://agora:agora@127.0.0.1:5432
#
# Idempotent. Needs root (or sudo) only to install and start the server.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v pg_ctlcluster > /dev/null || [ -z "$(ls /usr/lib/postgresql 2> /dev/null)" ]; then
  echo "postgres.sh: installing PostgreSQL from Debian's packages" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql > /dev/null
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version main"; then
  as_root pg_createcluster "$version" main >&2
fi
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -qx online; then
  as_root pg_ctlcluster "$version" main start >&2
fi
port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')
for _ in $(seq 1 30); do
  as_root su postgres -c "psql -p $port -qAtc 'select 1'" > /dev/null 2>&1 && break
  sleep 1
done
as_root su postgres -c "psql -p $port -qAt" > /dev/null << 'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'agora') THEN
    CREATE ROLE agora LOGIN CREATEDB PASSWORD 'agora';
  END IF;
END $$;
SQL
echo "PostgreSQL $version on port $port (role agora)" >&2
echo "export AGORA_TEST_POSTGRES_URL=postgres://agora:agora@127.0.0.1:$port"
