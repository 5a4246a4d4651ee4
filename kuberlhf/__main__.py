from kuberlhf.cli import main

main()
