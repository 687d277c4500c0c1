"""Tether's command line; the mesh itself lives in proxy/, registry/ and controlplane/."""
