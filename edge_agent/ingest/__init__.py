"""Where a reading is taken in and validated: the sources and the reading decoder."""
