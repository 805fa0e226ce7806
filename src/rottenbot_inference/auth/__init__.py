"""Authentication: access-token verification and revocation checks."""
