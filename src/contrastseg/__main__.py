from contrastseg.cli import main

main()
