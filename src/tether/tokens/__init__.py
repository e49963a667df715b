"""Keys, sealing, task tokens and proofs of possession."""

from tether.tokens._keys import CA_USE, JWT_USE, KeyRing, new_ec_key, public_jwk
from tether.tokens._proof import ProofKey
from tether.tokens._seal import KEK_ENV, Sealer, load_kek
from tether.tokens._task_token import act_claim, mint_task_token

__all__ = [
    "CA_USE",
    "JWT_USE",
    "KEK_ENV",
    "KeyRing",
    "ProofKey",
    "Sealer",
    "act_claim",
    "load_kek",
    "mint_task_token",
    "new_ec_key",
    "public_jwk",
]
