"""The elastic agent: supervises the workers of one node and keeps them in a rendezvous-formed group."""
