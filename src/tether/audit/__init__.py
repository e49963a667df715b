"""Receipts and the tamper-evident audit chain."""

from tether.audit._chain import GENESIS, Auditor, VerifyReport, record_hash

__all__ = ["GENESIS", "Auditor", "VerifyReport", "record_hash"]
