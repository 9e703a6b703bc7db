"""Secure aggregation by pairwise masking with dropout recovery (Bonawitz et al. 2017): the coordinator
learns only the weighted sum of the clients' updates. The data owner's side is
:class:`SecAggClient`; the coordinator's is :class:`offsite.cloud.secagg_server.SecAggServer`. The
design, the stages and the threat model are in ``docs/security.md`` ("Secure aggregation").

Modules: :mod:`.ring` (quantisation in ``Z_{2^k}``), :mod:`.shamir` (secret sharing),
:mod:`.crypto` (key agreement, masks, share encryption), :mod:`.config`, :mod:`.wire` and
:mod:`.messages` (the stage messages), :mod:`.records` (Flower records and envelope tensors),
:mod:`.client` (the client's state machine). Everything is re-exported here.
"""

from .client import STAGES, SecAggClient
from .config import SecAggConfig
from .crypto import (
    CIPHERTEXT_BYTES,
    NONCE_BYTES,
    PROTOCOL,
    SHARE_PLAINTEXT_BYTES,
    apply_mask,
    channel_key,
    decrypt_shares,
    encrypt_shares,
    expand_mask,
    pairwise_seed,
    public_key,
    self_mask_commitment,
    self_mask_seed,
)
from .errors import SecAggAbort, SecAggError
from .messages import (
    MESSAGES,
    EncryptedShares,
    KeyAdvertisement,
    KeyRoster,
    M,
    MaskedInput,
    SetupRequest,
    ShareBundle,
    UnmaskRequest,
    UnmaskShares,
)
from .records import (
    MASKED_TENSOR,
    SECAGG,
    SECAGG_VECTOR,
    from_content,
    masked_input_from_tensors,
    masked_input_reference,
    masked_input_tensors,
    to_content,
)
from .ring import (
    FLOAT_ERROR,
    MAX_SCALED,
    RING_BITS,
    ROUNDINGS,
    check_headroom,
    flatten_state,
    from_ring,
    max_scale_bits,
    quantisation_error_bound,
    quantise,
    ring_dtype,
    state_dimension,
    to_ring,
    unflatten_state,
)
from .shamir import KEY_BYTES, MAX_SUBSETS, PRIME, SHARE_BYTES, RandomBytes, Share, shamir_combine, shamir_split
from .wire import MAX_DIMENSION, MAX_HEADER_BYTES, MAX_NODE_ID, MAX_NODES

__all__ = [
    "CIPHERTEXT_BYTES", "FLOAT_ERROR", "KEY_BYTES", "MASKED_TENSOR", "MAX_DIMENSION", "MAX_HEADER_BYTES",
    "MAX_NODE_ID", "MAX_NODES", "MAX_SCALED", "MAX_SUBSETS", "MESSAGES", "NONCE_BYTES", "PRIME", "PROTOCOL",
    "RING_BITS", "ROUNDINGS", "SECAGG", "SECAGG_VECTOR", "SHARE_BYTES", "SHARE_PLAINTEXT_BYTES", "STAGES",
    "EncryptedShares", "KeyAdvertisement", "KeyRoster", "M", "MaskedInput", "RandomBytes", "SecAggAbort",
    "SecAggClient", "SecAggConfig", "SecAggError", "SetupRequest", "Share", "ShareBundle", "UnmaskRequest",
    "UnmaskShares", "apply_mask", "channel_key", "check_headroom", "decrypt_shares", "encrypt_shares",
    "expand_mask", "flatten_state", "from_content", "from_ring", "masked_input_from_tensors",
    "masked_input_reference", "masked_input_tensors", "max_scale_bits", "pairwise_seed", "public_key",
    "quantisation_error_bound", "quantise", "ring_dtype", "self_mask_commitment", "self_mask_seed",
    "shamir_combine", "shamir_split", "state_dimension", "to_content", "to_ring", "unflatten_state",
]
