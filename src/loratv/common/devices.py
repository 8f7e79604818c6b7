"""Device resolution: the one place that turns a user's device name into a torch.device or a clear refusal."""

import torch

from loratv.errors import BadInputError, param


def resolve_device(device: str) -> torch.device:
    """The torch device a computation runs on, checked before any work starts.

    Args:
        device: "cpu", "cuda" or "cuda:N".

    Returns:
        The torch.device.

    Raises:
        LoratvError: not a device name, CUDA absent, or a device type other than cpu and cuda.
    """
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadInputError(f"{param('device', device)}: not a device name (use cpu, cuda or cuda:N).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"{param('device', device)}: CUDA is not available on this machine.")
    if dev.type not in ("cpu", "cuda"):
        raise BadInputError(f"{param('device', device)}: only cpu and cuda are supported.")
    return dev
