"""The three BiDVL nets (energy net E(v), encoder q(h|v), generator G(h)) and the registry that
builds them from the `model` config. See registry.py for the API."""

from bidvl.models.registry import Nets, build_nets, cpu_state_dict, init_weights

__all__ = ["Nets", "build_nets", "cpu_state_dict", "init_weights"]
