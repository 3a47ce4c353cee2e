"""dirtybits: persistent dirty bitmaps for virtual disk images, byte-compatible with QEMU."""

__version__ = "0.1.0"
