"""The sampling core: noise schedules, samplers (pure functions), denoisers, step state."""
