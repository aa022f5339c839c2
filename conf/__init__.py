"""The Hydra config groups, shipped inside the wheel as ``cpds_exp.conf`` (see setup.cfg)."""
