"""The one way the Ray stages (embed, cluster, assign) reach Ray.

Why one helper: each Ray stage used to connect in its own way (one logged to the driver, one did
not; each remembered differently whether it had started the instance). ``ray.address`` joins an
existing cluster; otherwise a local instance starts with ``ray.num_cpus`` and
``ray.object_store_memory`` (docs/operations.md, "An existing Ray cluster").
"""

from __future__ import annotations

from megaclass.pipelines.config import RunConfig


def connect_ray(cfg: RunConfig, log_to_driver: bool = False) -> bool:
    """Join ``ray.address`` or start a local Ray instance with the configured resources.

    Returns True when this call started (and the caller may stop) the instance; False when Ray
    was already initialised in this process. ``log_to_driver`` forwards the workers' logs (the
    embed stage shows teacher warnings that way).
    """
    import ray  # Ray is imported only by the stages that use it

    if ray.is_initialized():
        return False
    kwargs = {"log_to_driver": log_to_driver, "configure_logging": False}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(
            num_cpus=cfg.ray.num_cpus,
            object_store_memory=cfg.ray.object_store_memory,
            include_dashboard=False,
            **kwargs,
        )
    return True
