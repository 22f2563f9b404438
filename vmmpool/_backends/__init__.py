"""Backends: the CUDA driver and the host emulator, behind one interface (``base.Backend``)."""
