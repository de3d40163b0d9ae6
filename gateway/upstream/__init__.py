"""Upstream: calling the providers (pool, dispatch with breaker, retries and failover), relaying and metering answers."""
