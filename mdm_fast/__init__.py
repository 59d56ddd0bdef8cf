"""mdm_fast: a performance-engineered engine for Matryoshka Diffusion Models."""
__version__ = "0.1.0"
