"""Helpers shared by the tests: app runners, the tiny causal LM, servers on loopback."""
