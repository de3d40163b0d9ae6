"""The response cache: identical requests answered once within a scope, never charged twice.

    keys       the exact-match key: endpoint, client model, the scope's identity, the canonical body
    control    the client's Cache-Control: no-cache (skip the lookup), no-store (neither read nor write)
    entry      what an entry holds (the answer and its usage, never a header or a key) and its codec
    assemble   a relayed stream's bytes, joined a slice at a time into the whole answer it stands for
    replay     a whole answer sent as the SSE events a provider would send
    store      the storage seam; redis_store (Redis, Cluster, Sentinel) and sqlite_store (embedded, LRU-bounded)
    memory     the entries a replica's hits read, in front of the store (bounded in bytes and held seconds)
    flights    single-flight: identical requests in flight on one replica make one upstream call
    service    ResponseCache: lookups, answers kept, and what is counted
    factory    the storage the configured budget store implies

No module here speaks HTTP: the request path's hook (lookup, serving a hit, keeping an answer) is
`gateway.http.cached`.
"""
