"""Serving: an OpenAI-compatible HTTP server with continuous batching, keys, plans, budgets and a ledger.

``zenlm serve MODEL_DIR`` runs it; from Python, ``build_server(ServeConfig(models=[...]))`` gives the
ASGI app. The heavy imports (FastAPI, SQLAlchemy) happen only when this package is used.
"""
from .app import ServeConfig, build_server, create_app, serve
from .billing import Billing, Plan, format_micros, to_micros

__all__ = ["ServeConfig", "build_server", "create_app", "serve", "Billing", "Plan", "format_micros", "to_micros"]
