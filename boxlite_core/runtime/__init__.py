"""The box lifecycle: records, the init pipeline, cleanup, the sync and asyncio APIs."""
