"""QMP, QEMU's machine protocol, as a sans-I/O core: bytes in, commands out; replies,
events and the greeting as bytes (``dirtybits.proto.qmp.core``)."""
