"""The apull image format as a node reads it: chunk tables, manifests, references, registries.

The converter that writes this format runs on the controller (`apull.image`); FORMAT.md here
describes what it writes and what the node code expects.
"""
