from flows.cli.commands import main

main()
