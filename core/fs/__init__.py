"""Filesystem work inside a layer root: directory-fd primitives, the apply engine (with its C fast path),
tree copies, changes and mounts."""
