"""Benchmarks: the runner (`runner`: suites, methods, the timed loop and its CLI), the metrics (`metrics`) and the
record, tables and plots (`report`)."""
