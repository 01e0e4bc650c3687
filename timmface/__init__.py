"""timmface: any timm backbone as a face-recognition model, and distillation from frozen teachers."""

__version__ = "0.1.0"

import warnings as _warnings

# torchvision 0.29 deprecates its JPEG codec in favour of TorchCodec, yet it remains the fastest
# decoder available with the pinned torchvision; the warning would otherwise fire once per image.
_warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
