"""Built-in storage drivers, one module per driver."""
