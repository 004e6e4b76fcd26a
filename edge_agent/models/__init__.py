"""A model on disk: the pack format, signed releases, fetching large files, the model store."""
