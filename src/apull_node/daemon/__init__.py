"""apulld, the node daemon: owns the cache backend (/dev/cachefiles or FUSE) and the blob list.

Standard library only: apulld ships as a zipapp onto nodes that run the distribution's python3.
"""
