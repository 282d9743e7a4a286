"""The kdnas application layer: the command line (and, later, flow entry points)."""
