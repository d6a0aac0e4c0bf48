"""vmigdb's TCG plugin for QEMU: runctl.c, its API header, and its build (build.py)."""
