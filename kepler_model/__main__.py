from kepler_model.cli import main

main()
