"""The gateway's own identity: its key, its certificate, the claim that gets them (docs/fleet.md, "Provisioning")."""
