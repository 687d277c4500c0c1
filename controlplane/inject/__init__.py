"""Sidecar injection: Kubernetes pods (webhook and `tether inject`), compose files."""
