"""The rankd HTTP service: composes the retriever and the reranker behind FastAPI."""
