from skulk_core.cli import main

main()
