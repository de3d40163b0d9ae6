"""A canary rollback announced by webhook to the policies' alert receivers, each once.

The rollback is told only on the replica whose compare-and-set made it; each receiver (a distinct webhook
URL of the policies' `alerts`) gets one delivery through the budget alert path (`AlertSender`): claimed in
the store under a key naming the canary, so it is posted once and taken over by another replica if this
one dies before posting. The message names the route, providers, step and reason: never a key or a URL.
"""

from __future__ import annotations

import logging

from gateway.budget.alerts import AlertSender, Delivery
from gateway.routing.canary import Move
from gateway.routing.canary_runs import RECORD_TTL_S, CanaryRun, Rollback

__all__ = ["rollback_text", "announce_rollbacks"]

log = logging.getLogger("gateway.alerts")


def rollback_text(run: CanaryRun, move: Move) -> str:
    """The human message of a rollback."""
    canary, step = run.config, run.config.steps[move.to_step]
    return (f"Canary rolled back: route '{run.route}' sends 100% to its control '{canary.control.provider}' "
            f"again, away from candidate '{canary.candidate.provider}' (it had {step}%): {move.reason}. "
            "It stays rolled back until the canary's config changes.")


def announce_rollbacks(sender: AlertSender) -> Rollback:
    """A rollback listener that queues one webhook alert per receiver."""

    def announce(run: CanaryRun, move: Move, now: float) -> None:
        """Queue the rollback's message for every receiver, under a key naming the canary and receiver."""
        receivers = sender.receivers()
        if not receivers:
            log.warning("canary '%s' rolled back; no policy has an alerts webhook to tell", run.route)
            return
        text = rollback_text(run, move)
        for url, policy in receivers.items():
            assert policy.alerts is not None
            body = {"content" if policy.alerts.format == "discord" else "text": text}
            sender.send(url, Delivery(f"canary:{run.id}:rolled_back:{policy.name}", policy.name, body,
                                      now + RECORD_TTL_S))

    return announce
