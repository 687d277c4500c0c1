"""What the control plane and the sidecars exchange: the resources and the push protocol.

The one package both sides import (`wire.resources`: the policy documents as frozen
dataclasses, decoded with field paths, encoded, checked one by one; `wire.push`: the
push protocol's messages). It imports nothing of `controlplane/` or `proxy/` and no
PyYAML: reading YAML with line numbers, the JSON Schema and the operator's command
line stay in `controlplane.schema`, so a sidecar loads only what it needs.
"""
