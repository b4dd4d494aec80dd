"""dicomtrolley's ``mint`` module under our package; the implementation is :mod:`trolley_tasks.searchers.mint`."""

from trolley_tasks.searchers.mint import Mint, MintQuery, MintStudy, parse_mint_studies_response

__all__ = ["Mint", "MintQuery", "MintStudy", "parse_mint_studies_response"]
