"""SPIFFE IDs and the peer check, for the CA's code: the neutral `wire.spiffe` re-exported.

The sidecar imports `wire.spiffe` directly (it imports nothing of `controlplane/`); the
CA and its tests keep this name.
"""

from wire.spiffe import MAX_CHAIN_DEPTH as MAX_CHAIN_DEPTH
from wire.spiffe import MAX_ID_LENGTH as MAX_ID_LENGTH
from wire.spiffe import PeerVerificationError as PeerVerificationError
from wire.spiffe import Role as Role
from wire.spiffe import SpiffeId as SpiffeId
from wire.spiffe import SpiffeIdError as SpiffeIdError
from wire.spiffe import identity_of as identity_of
from wire.spiffe import make_csr as make_csr
from wire.spiffe import new_key as new_key
from wire.spiffe import parse_spiffe_id as parse_spiffe_id
from wire.spiffe import renew_at as renew_at
from wire.spiffe import trust_domain_of as trust_domain_of
from wire.spiffe import verify_peer as verify_peer
