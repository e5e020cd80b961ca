"""Policy as code: the Istio-compatible model, loader, validation, evaluator and explain."""
