from memmgr.cli import main

main()
