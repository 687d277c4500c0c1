"""The control plane: policy resources, their validation and storage, the API and push."""
