"""Where a reading is scored: backends, the scorer, the scoring pipeline and drift."""
