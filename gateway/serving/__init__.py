"""Serving the app to clients: the listening socket, limits on client connections, start and stop."""
