from delo_dist.bench.cli import main

main()
