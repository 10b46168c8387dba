"""The tools ring (``pip install -e ".[tools]"`` from a checkout: click, tqdm, matplotlib, numpy): the ``memmgr`` command line,
``bench`` (the main job) with its real megatron-core workload, ledger rendering (``report``), ``doctor`` and the link
measurements they share (``measure``). The runtime never imports from here."""
