"""Micro-benchmarks of contrastseg components."""
