"""The node binaries: two executable zipapps built from this package, and their manifest.

`apulld` (standard library only) runs straight from its zip. `apull-containerd-grpc` carries
grpcio and protobuf built for the nodes' python3 and unpacks itself once per build into
/var/lib/apull/runtime (native modules cannot load from a zip). Both are reproducible: the
same sources give the same bytes, so an unchanged build is never re-sent to a node.
"""
