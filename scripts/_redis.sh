# Sourced by scripts/test and bench/run: the cluster tests and the cross-node benchmark need a
# Redis server on 127.0.0.1:6379 (or the one CALLGATE_TEST_REDIS_URL / CALLGATE_BENCH_REDIS_URL
# names). Start one, keeping nothing on disk, if none answers there.
ensure_redis() {
    if [[ -n "${CALLGATE_TEST_REDIS_URL:-}${CALLGATE_BENCH_REDIS_URL:-}" ]]; then
        return 0
    fi
    if "$venv/bin/python" -c 'import redis; redis.Redis(socket_connect_timeout=1).ping()' 2>/dev/null; then
        return 0
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        echo "WARNING: no Redis on 127.0.0.1:6379 and no redis-server to start: cluster tests will FAIL" >&2
        return 0
    fi
    echo "== starting redis-server on 127.0.0.1:6379 (no persistence)"
    local dir="${TMPDIR:-/tmp}/callgate-redis"
    mkdir -p "$dir"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --dir "$dir" --logfile "$dir/redis.log"
    for _ in $(seq 50); do
        "$venv/bin/python" -c 'import redis; redis.Redis().ping()' 2>/dev/null && return 0
        sleep 0.1
    done
    echo "WARNING: redis-server did not answer; see $dir/redis.log" >&2
}
