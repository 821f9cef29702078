"""Who may call the server: bearer tokens with scopes, mTLS worker certificates, and the
principal each call runs as (docs/security.md)."""
