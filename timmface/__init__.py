"""timmface: any timm backbone as a face-recognition model, and distillation from frozen teachers."""

__version__ = "0.1.0"
