"""qio: a Python re-creation of QEMU 7.2's qemu-io block-I/O debugging shell."""

__version__ = "0.1.0"
