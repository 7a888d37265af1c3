from apactl.cli import main

main()
