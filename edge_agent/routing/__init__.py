"""Where a decision is routed: the escalation policy and the reconciler of cloud verdicts."""
