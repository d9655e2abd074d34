"""Large-batch optimisers: LARS, LAMB and AdamP (``optim="lars" | "lamb" | "adamp"``)."""
