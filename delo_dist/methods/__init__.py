"""The prompt methods' model side (MAP, MSP, L2P, DualPrompt, CODA-Prompt, RebQ): one module per
method, the pools they share in prompt_pools.py (whose docstring states the interface every
method module follows and its contract with the backbone's prompt hooks)."""
