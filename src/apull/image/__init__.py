"""apull images: OCI images whose layers are EROFS filesystems with chunk digest tables.

`apull-image-build convert` reads an OCI / Docker v2 image from a registry and writes the
converted image to a registry; FORMAT.md in this package describes what it writes.
"""
