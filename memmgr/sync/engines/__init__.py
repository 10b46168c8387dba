"""Adapters that feed memmgr's weight sync into inference engines (``vllm``: vLLM's weight-transfer protocol).
Each imports its engine, so import the adapter package itself (``memmgr.sync.engines.vllm``) where the engine is
installed."""
