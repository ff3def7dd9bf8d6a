"""The torchvision backend (:class:`TorchvisionDetector`), one module per job; configs name
``alrun.detectors.torchvision.TorchvisionDetector``."""

from alrun.detectors.torchvision.adapter import TorchvisionDetector, resolve_device
from alrun.detectors.torchvision.families import family_capabilities
from alrun.detectors.torchvision.mc_dropout import HeadDropout, install_head_dropout

__all__ = [
    "HeadDropout",
    "TorchvisionDetector",
    "family_capabilities",
    "install_head_dropout",
    "resolve_device",
]
