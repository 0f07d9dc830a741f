"""Session fixtures for this component (filled by its author)."""
