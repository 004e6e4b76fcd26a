"""The cloud side: the fallback worker (urgent and batch tiers), its ledger and endpoint."""
