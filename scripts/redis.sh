#!/usr/bin/env bash
# Makes sure a Redis answers on 127.0.0.1:${NEXUS_TEST_REDIS_PORT:-6379}; starts one if none does.
# The tests use a real server, never a mock.
set -euo pipefail
port="${NEXUS_TEST_REDIS_PORT:-6379}"

ping() { redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; }

if ping; then
  echo "[redis] answering on 127.0.0.1:$port" >&2
  exit 0
fi
dir="${TMPDIR:-/tmp}/nexus-redis-$port"
mkdir -p "$dir"
echo "[redis] starting redis-server on 127.0.0.1:$port (data in $dir)" >&2
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --dir "$dir" \
  --save "" --appendonly no --logfile "$dir/redis.log"
for _ in $(seq 1 50); do
  ping && exit 0
  sleep 0.1
done
echo "[redis] redis-server did not answer on 127.0.0.1:$port; see $dir/redis.log" >&2
exit 1
