# One image for every part of the mesh: `tether registry|controlplane|sidecar|apply ...`,
# and the demo apps (`python -m tether.demo.<service>`). Used by docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The build reads pyproject.toml and README.md (the package's readme); the packages
# are the ones pyproject.toml ships.
COPY pyproject.toml README.md ./
COPY tether ./tether
COPY proxy ./proxy
COPY registry ./registry
COPY controlplane ./controlplane
COPY examples ./examples

# iptables: the init container of `tether inject --capture iptables` (Kubernetes) runs
# this image to redirect the app's outbound TCP to its sidecar.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*

# /data is the registry's state (a named volume takes this directory's owner).
RUN pip install . \
    && useradd --create-home --uid 10001 --user-group tether \
    && mkdir /data \
    && chown tether:tether /data

USER tether

ENTRYPOINT ["tether"]
CMD ["--help"]
