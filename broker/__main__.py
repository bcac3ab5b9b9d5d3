from sfs.broker.cli import main

main()
