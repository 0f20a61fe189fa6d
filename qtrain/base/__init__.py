"""The base layer: errors, atomic file I/O, folder locks, name lookup, optional dependencies,
random streams, stop requests by signal.

Every other layer may import from here; nothing here imports another qtrain package.
"""
