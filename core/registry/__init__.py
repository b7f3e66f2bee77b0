"""Registries: the OCI distribution client, credentials, pull and push."""
