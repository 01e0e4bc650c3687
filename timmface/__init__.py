"""timmface: any timm backbone as a face-recognition model, and distillation from frozen teachers.

Where things live (each module imports only from the ones it builds on; ``tests/test_layout.py`` keeps it so):
foundations (:mod:`~timmface.errors`, :mod:`~timmface.fileio`, :mod:`~timmface.config`, :mod:`~timmface.runtime`,
:mod:`~timmface.distributed`, :mod:`~timmface.checkpoint`); :mod:`timmface.data` (formats, the micro-batch,
loaders); model and losses (:mod:`~timmface.losses`, :mod:`~timmface.model`, :mod:`~timmface.partial_fc`,
:mod:`~timmface.optim`, :mod:`~timmface.ema`); :mod:`~timmface.trainer` and :mod:`~timmface.distill` on top;
:mod:`timmface.evaluation`, :mod:`timmface.embedding`, :mod:`~timmface.export`, :mod:`~timmface.report`; and
:mod:`timmface.commands`, one module per ``timmface`` subcommand (dispatched by :mod:`~timmface.cli`).
"""

__version__ = "0.1.0"

import warnings as _warnings

# torchvision 0.29 deprecates its JPEG codec in favour of TorchCodec, yet it remains the fastest
# decoder available with the pinned torchvision; the warning would otherwise fire once per image.
_warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
