"""Pure on-disk records: bytes in, validated records out. No I/O here."""
