#!/bin/sh
# Kept for habit: the old tools/sync_bin.sh, now `apull sync-bin` (parallel, checksummed,
# atomic, --rollback). With no arguments it syncs to the nodes config.txt names; the old way,
# the hosts in tools/servers.txt:  tools/sync_bin.sh --servers tools/servers.txt
here=$(cd "$(dirname "$0")/.." && pwd)
exec "$here/.venv/bin/apull" sync-bin "$@"
