"""Image formats: OCI and Docker documents, image configs, references, OCI layouts and docker-archives."""
