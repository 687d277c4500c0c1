"""Tether's sidecar proxy: the data plane beside every service instance."""
