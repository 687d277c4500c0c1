"""Tether's sidecar proxy: the data plane beside every service instance."""

# Before any per-request module is imported: decide between the compiled build and the
# pure-Python sources (proxy/build_info.py).
from proxy import build_info as build_info
