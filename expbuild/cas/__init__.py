"""The content-addressable storage (CAS).

`expbuild.cas.store.FileStore` keeps blobs as files named by their SHA-256
digest under a root directory. It verifies every blob it accepts, publishes
blobs atomically, and does all disk I/O off the event loop.
"""
