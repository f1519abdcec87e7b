"""pytest plugin registered through the ``pytest11`` entry point (fixtures live in simulator.fixtures)."""
