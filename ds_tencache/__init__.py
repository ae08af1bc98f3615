"""ds_tencache: resource-aware tensor caching and migration for DeepSpeed ZeRO-3 (10Cache).

``import ds_tencache`` binds it to DeepSpeed, so a plain ``deepspeed.initialize`` whose config has
a ``"tencache"`` block activates it; ``ds_tencache.initialize`` is the explicit drop-in. The
policy modules (config, profile, plan, controller, metrics) import no DeepSpeed and work without it.
"""

from importlib.util import find_spec

__version__ = "0.1.0"

if find_spec("deepspeed") is not None:
    from ds_tencache.deepspeed_hooks import initialize, install, tencache_controller

    install()
    __all__ = ["initialize", "tencache_controller", "__version__"]
