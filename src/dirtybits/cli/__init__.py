"""Command line: qemu-img-like subcommands."""
