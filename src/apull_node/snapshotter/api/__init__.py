"""The snapshotter's wire contract: our .proto files and the stubs generated from them.

`python -m apull_node.snapshotter.api.generate` writes mount_pb2, snapshots_pb2 and
snapshots_pb2_grpc next to the .proto files; they are build products, not in git. Import them
from their modules (this package imports nothing, so generate.py runs before they exist).
"""
