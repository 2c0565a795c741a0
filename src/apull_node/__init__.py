"""apull node code: everything the node binaries run, and nothing else.

`apulld` (daemon/) and `apull-containerd-grpc` (snapshotter/, cri/) are built from this
package alone, with service/ (settings, sockets, logs, systemd) and image/ (the image format
they serve). It runs on the nodes' own python3, 3.9 or newer, on x86-64 and aarch64: keep it
to that language level (`make lint` checks it with vermin) and import nothing from `apull`,
the controller's package.
"""

__version__ = "0.1.0"
