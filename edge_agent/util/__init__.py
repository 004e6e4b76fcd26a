"""Small helpers every folder may use: files written atomically, digests, percentiles, progress."""
