"""The nemesis: faults with inject + heal (processes, network proxy, store, timers, clock)."""
