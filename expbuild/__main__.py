from expbuild.cli.main import main

main()
