"""Domain: the values every layer shares (request, plan and targets, money and usage, token bounds, worst case); no I/O."""
