"""none: the identity; every visual token reaches every layer."""
from . import Method, register


@register("none")
class NoReduction(Method):
    pass
