"""Integrations: discover the state a framework keeps on the GPU and build a MemoryManager for it.

One module per framework; the core knows only tensors, groups and buffers.
"""
