"""Shared test support: helpers, the loopback Hub server, the float64 reference Vim, device emulation, a toy
model family."""
