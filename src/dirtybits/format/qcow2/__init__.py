"""qcow2 on-disk structures (``docs/interop/qcow2.txt``)."""
