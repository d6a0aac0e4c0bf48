"""vmigdb: a stealth GDB remote stub for whole virtual machines."""
