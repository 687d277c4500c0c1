# One image for every part of the mesh: `tether registry|controlplane|sidecar|apply ...`,
# and the demo apps (`python -m tether.demo.<service>`). Used by docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The build reads pyproject.toml and README.md (the package's readme); the packages
# are the ones pyproject.toml ships (the demo's policies are in tether/demo/policies).
COPY pyproject.toml README.md ./
COPY tether ./tether
COPY proxy ./proxy
COPY registry ./registry
COPY controlplane ./controlplane
COPY wire ./wire

# iptables: the init container of `tether inject --capture iptables` (Kubernetes) runs
# this image to redirect the app's outbound TCP to its sidecar.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*

# /data is the registry's state, /ca the mesh CA's root key (the control plane's
# TETHER_CA_KEY_DIR); a named volume takes its directory's owner and mode.
RUN pip install . \
    && groupadd --gid 10001 tether \
    && useradd --create-home --uid 10001 --gid 10001 tether \
    && mkdir /data \
    && chown 10001:10001 /data \
    && mkdir -m 0700 /ca \
    && chown 10001:10001 /ca

# Numeric, so the runtime knows it is not root without reading /etc/passwd (DL3066).
USER 10001:10001

ENTRYPOINT ["tether"]
CMD ["--help"]
