from tagfer.cli import main

main()
