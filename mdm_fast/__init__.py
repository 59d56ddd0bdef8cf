"""mdm_fast: a performance-engineered engine for Matryoshka Diffusion Models.

``mdm_fast.build_model`` builds the fast NestedUNet from a public config; ``mdm_fast.optimize``
converts a reference or public-code model; ``mdm_fast.reference`` is the pure-PyTorch oracle.
"""
__version__ = "0.1.0"


def build_model(model_name, unet_config, input_channels=3, output_channels=3, impl="auto", channels_last=True):
    """The fast model; see :func:`mdm_fast.models.build_model`."""
    from mdm_fast.models import build_model as _build

    return _build(model_name, unet_config, input_channels, output_channels, impl, channels_last)


def optimize(module, impl="auto", channels_last=True):
    """The fast version of a reference or public-code model; see :func:`mdm_fast.models.optimize`."""
    from mdm_fast.models import optimize as _optimize

    return _optimize(module, impl, channels_last)
