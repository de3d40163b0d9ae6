"""Configuration: the typed model and the loader that validates YAML into it."""
