"""The ledger: every Redis key of a job, and the Lua transitions that keep them consistent (docs/engine.md)."""

from trolley_tasks.engine.ledger.ledger import JOBS_KEY, Ledger
from trolley_tasks.engine.ledger.transitions import Claim, ClaimCode, Expansion, Outcome, Settled, Stored

__all__ = ["JOBS_KEY", "Claim", "ClaimCode", "Expansion", "Ledger", "Outcome", "Settled", "Stored"]
