"""asyncio services: QMP, NBD, jobs."""
