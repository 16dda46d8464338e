"""rankd's composition root (the ``rankd`` command) and what both stages share: the
micro-batcher and the allocator's memory release. The stages themselves are ``retriever`` and
``reranker``; ``service`` puts them behind HTTP."""
