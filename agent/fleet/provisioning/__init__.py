"""The operator's provisioning responder: allow-list, issuing CA, rate limit, CRL (docs/fleet.md, "Provisioning")."""
