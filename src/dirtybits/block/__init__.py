"""Block layer: image drivers (raw, qcow2) behind one interface."""
