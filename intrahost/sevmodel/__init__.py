"""The model platform: a software stand-in for KVM's SEV code and the AMD secure processor.

It runs as a service process (``service.py``, the stand-in for the kernel) that VMM processes
reach over a unix socket (``client.py``). ``kvm_sev.py`` models ``arch/x86/kvm/svm/sev.c``,
``firmware.py`` the secure processor; ``attached.py`` makes the VMM's real KVM VM behave as
the kernel's SEV VM would. See ``docs/sev.md`` for what is and is not modelled.

Importing this package registers the ``"model"`` platform with :mod:`intrahost.sev.platforms`
(the layer below, which does not know this one).
"""

from intrahost.sev.platforms import register_platform
from intrahost.sevmodel.client import ModelPlatform, ModelVm

register_platform("model", ModelPlatform)

__all__ = ["ModelPlatform", "ModelVm"]
