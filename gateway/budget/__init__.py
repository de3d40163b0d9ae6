"""Budgets: reserve a request's worst case before the upstream call, settle its real cost after.

`engine` holds the rules and leans on one part per job: `store_calls` (how store calls are made, bounded
and kept), `outage` (store failures, fail-open allowance, journal, recovery), `settlements` and
`reserve_ahead` (spare reservations). The store seam is `store` (the contract and its capabilities),
implemented by `redis_store` (its drivers in `redis_driver` and `redis_batch`), `sqlite_store` and the
timing wrapper `instrumented`.
"""
