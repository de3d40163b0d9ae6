"""Observability: what the gateway tells about its requests (the access record and log, Prometheus metrics).

    access_log   AccessRecord (what was learned serving one request) and its JSON log line
    instruments  GatewayMetrics: the metrics and the callbacks that update them
    labels       label values bounded by the active config
    scrape       budget windows, breaker states and config reloads read per scrape
    merge        sibling workers' families summed into one exposition (`gateway run --workers N`)
    served, histograms  collectors of the request metrics
"""
