"""ExpBuild: a remote execution service for REAPI v2 clients, backed by PostgreSQL."""

__version__ = "0.1.0"
