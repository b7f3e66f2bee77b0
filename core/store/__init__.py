"""The store: the database, layers, images, containers, content blobs and leases.

It is the only package that touches the database."""
