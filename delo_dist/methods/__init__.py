"""Method plug-ins: one module per method (the protocol: delo_dist/models/method.py).
The prompt methods (MAP, MSP, L2P, DualPrompt, CODA-Prompt, RebQ) share their pools in
prompt_pools.py, whose docstring states their contract with the backbone's prompt hooks, and
their plug-in side (the shared head, the passes) in prompting.py."""
