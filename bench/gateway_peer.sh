#!/usr/bin/env bash
# Start kimi-gateway as a peer of the shared proxy benchmark (/work/shared/bench, EXTRA_PEER hook):
#
#   bench/gateway_peer.sh PORT UPSTREAM_PORT
#
# Writes a throw-away config into a fresh temp dir (printed on stderr): one upstream of kind openai at
# http://127.0.0.1:UPSTREAM_PORT/v1 serving kimi-k2-thinking and kimi-k2-thinking-turbo, one tenant
# whose key is sk-bench (stored as sha256:<hex>), both candidates priced at Moonshot's
# kimi-k2-thinking list prices, a SQLite ledger in the temp dir (or GATEWAY_PEER_LEDGER_URL), log_level
# warning. Then it execs
#   kimi-gateway serve --config CONFIG --port PORT --host 127.0.0.1
# so the PID the harness pins, measures and signals is the gateway itself.
#
# Environment:
#   KIMI_GATEWAY_BIN   the kimi-gateway executable (default: the one in this checkout's .venv, i.e.
#                      next to the Python that has the package installed; else kimi-gateway on PATH)
#   GATEWAY_PEER_DIR   directory for the config files (default: mktemp -d under $TMPDIR or /tmp)
#   GATEWAY_PEER_KEY   tenant key (default sk-bench, what the shared harness sends)
#   GATEWAY_PEER_LEDGER_URL  ledger URL (default sqlite:///DIR/ledger.db), e.g. postgresql://... to
#                      measure the gateway with the ledger's inserts in the database server
#   GATEWAY_SRC        run the gateway package of another checkout (PYTHONPATH=GATEWAY_SRC in front of
#                      the venv's editable install), e.g. a git worktree of an older commit; a checkout
#                      from before metering (no LedgerConfig in gateway/config.py) gets a config without
#                      the policy_files/prices/ledger keys its schema refuses
#
# Example (shared harness):
#   EXTRA_PEER='gateway:18004:/work/main/bench/gateway_peer.sh {port} {upstream_port}' ./run_peer_bench.sh
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 PORT UPSTREAM_PORT" >&2
    exit 2
fi
PORT=$1
UPSTREAM_PORT=$2
HERE=$(cd "$(dirname "$0")" && pwd)
KEY=${GATEWAY_PEER_KEY:-sk-bench}

BIN=${KIMI_GATEWAY_BIN:-}
if [ -z "$BIN" ]; then
    if [ -x "$HERE/../.venv/bin/kimi-gateway" ]; then
        BIN=$HERE/../.venv/bin/kimi-gateway
    else
        BIN=$(command -v kimi-gateway || true)
    fi
fi
if [ -z "$BIN" ] || [ ! -x "$BIN" ]; then
    echo "$0: no kimi-gateway executable (set KIMI_GATEWAY_BIN)" >&2
    exit 2
fi

if [ -n "${GATEWAY_SRC:-}" ]; then
    [ -f "$GATEWAY_SRC/gateway/__init__.py" ] || { echo "$0: no gateway package in $GATEWAY_SRC" >&2; exit 2; }
    export PYTHONPATH=$GATEWAY_SRC${PYTHONPATH:+:$PYTHONPATH}
fi

DIR=${GATEWAY_PEER_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gateway-peer.XXXXXX")}
mkdir -p "$DIR/policies"

if command -v sha256sum >/dev/null; then
    HASH=$(printf '%s' "$KEY" | sha256sum | cut -d' ' -f1)
else
    HASH=$(printf '%s' "$KEY" | python3 -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
fi

cat > "$DIR/policies/bench.yaml" <<EOF
tenant: bench
description: shared proxy benchmark tenant (key $KEY)
keys:
  - sha256:$HASH
models:
  kimi-k2-thinking:
    candidates: [bench-upstream/kimi-k2-thinking]
  kimi-k2-thinking-turbo:
    candidates: [bench-upstream/kimi-k2-thinking-turbo]
EOF

# Moonshot list prices for kimi-k2-thinking, USD per 1M tokens, for both candidates
cat > "$DIR/prices.yaml" <<EOF
currency: USD
prices:
  - {target: bench-upstream/kimi-k2-thinking, effective_from: 2025-01-01, input_miss: "0.60", input_hit: "0.15", output: "2.50"}
  - {target: bench-upstream/kimi-k2-thinking-turbo, effective_from: 2025-01-01, input_miss: "0.60", input_hit: "0.15", output: "2.50"}
EOF

METERING="policy_files: [bench.yaml]
prices: prices.yaml
ledger: {url: \"${GATEWAY_PEER_LEDGER_URL:-sqlite:///$DIR/ledger.db}\"}"
if [ -n "${GATEWAY_SRC:-}" ] && ! grep -q "class LedgerConfig" "$GATEWAY_SRC/gateway/config.py"; then
    METERING="# pre-metering checkout: no policy_files/prices/ledger keys"
fi

cat > "$DIR/gateway.yaml" <<EOF
listen: {host: 127.0.0.1, port: $PORT}
log_level: warning
policies_dir: policies
$METERING
upstreams:
  bench-upstream:
    kind: openai
    base_url: http://127.0.0.1:$UPSTREAM_PORT/v1
    models: [kimi-k2-thinking, kimi-k2-thinking-turbo]
EOF

echo "gateway_peer: config in $DIR, $BIN${GATEWAY_SRC:+ (gateway code from $GATEWAY_SRC)} on 127.0.0.1:$PORT -> 127.0.0.1:$UPSTREAM_PORT" >&2
exec "$BIN" serve --config "$DIR/gateway.yaml" --port "$PORT" --host 127.0.0.1
