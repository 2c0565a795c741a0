"""A CRI image client: pulls through containerd's CRI plugin, the path kubelet takes and the
one on which containerd 1.6 pulls lazily through a remote snapshotter.

`client` holds the typed client, `cli` the `cri` command (`apull cri` on the controller,
`apull-containerd-grpc cri` on a node), `api` the wire contract.
"""
