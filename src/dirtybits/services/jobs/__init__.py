"""Block jobs (QEMU's job framework: statuses, verbs, events) and the job types built on it."""
