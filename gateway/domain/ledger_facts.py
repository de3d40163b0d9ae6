"""What the spend ledger records of one request besides its reservation and charge."""

from __future__ import annotations

from typing import NamedTuple

from gateway.domain.pricing import Usage

__all__ = ["LedgerFacts"]


class LedgerFacts(NamedTuple):
    """How a request was served: by which model and provider, in how many upstream calls, with what usage."""

    model: str | None                # the model that served (or was to serve) it
    requested_model: str | None      # the model the client asked for
    provider: str | None
    attempts: int                    # upstream calls made
    usage: Usage | None              # what was charged for, when it was served
    started: float                   # time.perf_counter() at its arrival (the ledger's latency)
    endpoint: str | None = None      # chat, completions, embeddings, responses or messages
    user: str | None = None          # the end user it was made for (gateway.domain.end_user)
    session: str | None = None
