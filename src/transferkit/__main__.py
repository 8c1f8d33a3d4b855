from transferkit.cli import main

main()
