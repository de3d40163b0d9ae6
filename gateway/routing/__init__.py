"""Choosing where a request goes: weighted splits, canaries that ramp and roll back, rules that pick a model.

    split          a stable point per caller, and the arm a point falls on
    latency        latency buckets shared by replicas, and their p95
    canary         the canary state machine: a pure function of (record, config, clock) -> move
    canary_runs    each canary's local tally, cached step and background sync with the store
    canary_alerts  the rollback webhook, through the budget alert receivers
    rules          what a request has, and the first rule it meets
    router         the one step the handler takes: client model -> plan (and the arm to tally)
"""
