"""LoRA flavours, one small file each, plugged into `LoraLayer` through the `Variant` strategy interface."""
