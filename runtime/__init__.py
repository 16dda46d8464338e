"""The bottom floor: what both stages and the service run on, importing nothing of rankd's own.
The one micro-batcher (``batching``), the allocator's memory release (``memory``) and the logging
setup with its one setting (``logs``)."""
