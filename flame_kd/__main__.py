from flame_kd.cli import main

main()
