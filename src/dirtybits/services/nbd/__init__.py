"""The NBD server (asyncio) over the sans-I/O core in ``dirtybits.proto.nbd``."""
