"""The mesh CA's errors; each knows the HTTP status and code the API answers with."""

from __future__ import annotations

from controlplane.errors import ControlPlaneError


class CAError(ControlPlaneError):
    status = 500
    code = "ca_error"


class CSRError(CAError):
    """A certificate signing request that cannot be signed as sent."""

    status = 400
    code = "bad_csr"


class CANotConfiguredError(CAError):
    """No key protection (encryption key, key directory) or operator CA was given."""

    status = 503
    code = "ca_not_configured"


class CAConfigError(CAError):
    """A CA setting (flag, environment variable, file) that cannot be used."""

    status = 500
    code = "ca_config"


class IdentityDeniedError(CAError):
    """The caller's credential does not allow the identity it asked for."""

    status = 403
    code = "permission_denied"


class KeyProtectionError(CAError):
    """A stored CA key that this replica cannot open (another encryption key, a file
    with loose permissions)."""

    status = 500
    code = "ca_key"


class KubernetesUnavailableError(CAError):
    """The Kubernetes API could not review a token (unreachable, or an odd answer)."""

    status = 503
    code = "kubernetes_unavailable"
