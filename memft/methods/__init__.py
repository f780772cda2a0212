"""memft's methods, registered once each (memft.methods.registry): importing this package registers the
built-in ones."""

from memft.methods import activations, adapters, losses, optimizers  # noqa: F401  (they register themselves)
from memft.methods.registry import (Method, OptimizerPlan, PreparedModel, Section, Variant, get, methods, register,
                                    unregister, used)

__all__ = ["Method", "OptimizerPlan", "PreparedModel", "Section", "Variant", "get", "methods", "register",
           "unregister", "used"]
