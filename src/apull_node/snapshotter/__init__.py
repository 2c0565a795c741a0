"""apull-containerd-grpc: containerd's proxy snapshotter for apull.

It serves containerd.services.snapshots.v1.Snapshots on a unix socket and keeps snapshots the
way containerd's overlayfs snapshotter does: metadata in SQLite, each snapshot's files in
`<root>/snapshots/<id>/{fs,work}`, overlay or bind mounts handed back to containerd. Layers of
apull images become remote snapshots: mounted from apulld as EROFS, never downloaded whole
(remote.py).

Standard library, grpc and protobuf only: it ships as a zipapp onto nodes without a venv.
"""
