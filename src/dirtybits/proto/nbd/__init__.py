"""The NBD protocol with no I/O: constants, wire layouts, the server's state machine, a client
core, and QEMU's block-status extent rules."""
