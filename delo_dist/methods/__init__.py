"""Method plug-ins: one module per method (the protocol: delo_dist/models/method.py)."""
