"""One package per adaptation method. Importing this package registers every method's config."""

from adapters_core.methods import lora as lora

__all__ = ["lora"]
