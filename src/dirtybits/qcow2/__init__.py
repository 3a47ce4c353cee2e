"""The qcow2 image engine: metadata caches, allocation, refcounts, backing chains, check."""
