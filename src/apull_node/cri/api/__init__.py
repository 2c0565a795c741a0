"""The CRI image service's wire contract (runtime.v1.ImageService): our images.proto and the
stubs generated from it.

`python -m apull_node.snapshotter.api.generate` (the one generate step, run by `make venv` and the
bundle build) writes images_pb2 and images_pb2_grpc next to images.proto; they are build
products, not in git. This package imports nothing, so the generator runs before they exist.
"""
