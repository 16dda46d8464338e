"""HTTP clients of rankd: the batch client, the evaluator and the load-test harness."""
