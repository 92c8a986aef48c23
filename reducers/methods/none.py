"""none: the identity; every visual token reaches every layer, so it takes no budget."""
from . import Method, register


@register("none")
class NoReduction(Method):
    takes_budget = False
