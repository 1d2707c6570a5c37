"""The server's routes, one module per area, each an ``APIRouter`` of handlers only: a handler reads
the request, checks it, and runs it through the one metering path (``serve/metering.py``). The app
(``serve/app.py``) mounts them."""
