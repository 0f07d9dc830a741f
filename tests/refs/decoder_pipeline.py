"""Session fixtures for this pipeline (filled by its author)."""
