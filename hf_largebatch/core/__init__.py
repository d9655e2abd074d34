"""The plumbing every algorithm plugs into: the trainer, its events and step state, the composition check, the
gradient-statistics estimator, the split-invariant loss, the LR scaling rules and what differs between backends."""
