"""The mesh CA: SPIFFE identities for sidecars and the control plane (docs/identity.md)."""
