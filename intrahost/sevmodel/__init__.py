"""The model platform: a software stand-in for KVM's SEV code and the AMD secure processor.

It runs as a service process (``service.py``, the stand-in for the kernel) that VMM processes
reach over a unix socket (``client.py``). ``kvm_sev.py`` models ``arch/x86/kvm/svm/sev.c``,
``firmware.py`` the secure processor. See ``docs/sev.md`` for what is and is not modelled.
"""

from intrahost.sevmodel.client import ModelPlatform, ModelVm, PlatformUnavailableError

__all__ = ["ModelPlatform", "ModelVm", "PlatformUnavailableError"]
