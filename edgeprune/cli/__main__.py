from edgeprune.cli import main

main()
