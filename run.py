"""Entry point: python run.py [overrides]; see README.md and conf/config.yaml."""
from cpds_exp.cli import main

if __name__ == "__main__":
    main()
