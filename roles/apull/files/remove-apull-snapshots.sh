#!/bin/sh
# Remove, in every containerd namespace, the containers whose snapshotter is apull and then
# every apull snapshot (children before parents: repeat until a pass removes nothing).
# containerd hands removed snapshots to the snapshotter in its garbage collection, which may
# run later; one is run now (a lease deleted with --sync), so the snapshotter, still running,
# unmounts its remote layers (EROFS on snapshots/<id>/fs) and deletes them itself.
set -u
command -v ctr >/dev/null || exit 0
ctr version >/dev/null 2>&1 || { echo "containerd does not answer: nothing removed"; exit 0; }
for ns in $(ctr namespaces ls -q); do
    for c in $(ctr -n "$ns" containers ls -q); do
        if ctr -n "$ns" containers info "$c" | grep -q '"Snapshotter": "apull"'; then
            ctr -n "$ns" tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
            ctr -n "$ns" tasks rm -f "$c" >/dev/null 2>&1 || true
            ctr -n "$ns" containers rm "$c" && echo "removed container $ns/$c"
        fi
    done
    pass=0
    total=0
    stuck=0
    while [ $pass -lt 64 ]; do
        keys=$(ctr -n "$ns" snapshots --snapshotter apull ls 2>/dev/null | awk 'NR>1 {print $1}')
        [ -n "$keys" ] || break
        gone=0
        for k in $keys; do
            ctr -n "$ns" snapshots --snapshotter apull rm "$k" >/dev/null 2>&1 && gone=$((gone+1))
        done
        if [ $gone -eq 0 ]; then
            # containerd's garbage collection may be removing them right now (a parent whose
            # last child went is collected too): look again, give up after a few tries.
            stuck=$((stuck+1))
            [ $stuck -lt 10 ] || { echo "could not remove apull snapshots in $ns: $keys" >&2; exit 1; }
            sleep 1
        else
            stuck=0
            echo "removed $gone snapshot(s) in $ns"
            total=$((total+gone))
        fi
        pass=$((pass+1))
    done
    if [ $total -gt 0 ]; then
        lease="apull-uninstall-$$"
        if ctr -n "$ns" leases create --id "$lease" >/dev/null; then
            ctr -n "$ns" leases rm --sync "$lease" >/dev/null ||
                echo "containerd's garbage collection failed in $ns" >&2
        fi
    fi
done
