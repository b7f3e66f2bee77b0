"""Driver plugins: the hook specifications and the discovery of built-in and third-party drivers."""
