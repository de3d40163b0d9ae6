"""HTTP: the middleware, caller authentication, app keys and route handlers that only put the steps in order."""
