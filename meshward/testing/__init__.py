"""Real collaborators for tests, the demo and benchmarks (never mocks): an OTLP receiver, etc."""
