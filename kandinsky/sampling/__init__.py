"""The sampling core: the noise schedule, samplers (pure functions), denoisers, step state."""
