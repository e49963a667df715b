"""Receipts and the verifiable audit log: a hash chain, tagged receipts, a Merkle tree
with signed tree heads, a witness, and offline bundles."""

from tether.audit._chain import (
    GENESIS,
    WITNESS_ENV,
    Auditor,
    LogTampered,
    PendingReceipt,
    VerifyReport,
    Witness,
    record_hash,
)
from tether.audit._rows import RowTags, RowTampered
from tether.audit._verifier import Report as BundleReport
from tether.audit._verifier import verify_bundle

__all__ = [
    "GENESIS",
    "WITNESS_ENV",
    "Auditor",
    "BundleReport",
    "LogTampered",
    "PendingReceipt",
    "RowTags",
    "RowTampered",
    "VerifyReport",
    "Witness",
    "record_hash",
    "verify_bundle",
]
