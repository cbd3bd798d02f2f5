from .lora import StarFlow2LoraLoaderMixin

__all__ = ["StarFlow2LoraLoaderMixin"]
