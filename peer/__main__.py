from sfs.peer.cli import main

main()
