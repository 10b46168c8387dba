"""The tools ring (``pip install -e ".[tools]"`` from a checkout: click, tqdm, matplotlib, numpy): the ``memmgr``
command line, ``bench`` (the main job) with its real megatron-core workload, ledger rendering (``report``), ``doctor``
and the link measurements they share (``measure``), and the tiny models the benchmarks, examples and tests build
(``megatron_models`` with ``megatron_cpu_shim``, ``vllm_models``) and the warm-up their bit-exact comparisons need on
the CPU (``cpu_math``). The runtime never imports from here."""
