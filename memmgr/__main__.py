from memmgr.tools.cli import main

main()
