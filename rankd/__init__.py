"""rankd's composition root (the ``rankd`` command, ``cli``) and the development harness shared
by tests and benchmarks (``devtools``): the top floor, above every package it wires together. The
stages are ``retriever`` and ``reranker``; ``service`` puts them behind HTTP; ``runtime`` is the
floor they all stand on."""
