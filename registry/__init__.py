"""Tether's embedded registry: a Consul-compatible HTTP API over a durable local store."""
