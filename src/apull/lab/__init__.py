"""The local lab: real QEMU nodes, a private network and a registry on one host."""
