"""cpds-exp: DDS, PDS, CDS and CPDS image editing by score distillation on Stable Diffusion."""

__version__ = "0.1.0"
