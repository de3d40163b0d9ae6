"""LLM cost gateway: an OpenAI-compatible sidecar that enforces budgets and keeps apps answering."""

__version__ = "0.1.0"
