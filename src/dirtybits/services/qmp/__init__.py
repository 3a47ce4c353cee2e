"""The QMP service: the asyncio server and the daemon's commands."""
