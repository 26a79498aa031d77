from optagent.cli import main

main()
