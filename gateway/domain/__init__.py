"""Domain: the values every layer shares (request, plan, money and usage, token bounds, worst case); no I/O."""
