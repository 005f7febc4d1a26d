"""cai_ray: Constitutional AI from a base model at scale on Ray."""

__version__ = "0.1.0"
