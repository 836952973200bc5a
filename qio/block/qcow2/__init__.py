"""The ``qcow2`` format driver, split by concern as QEMU splits ``block/qcow2*.c``.

``qio.block.qcow2`` stays the driver's module name (the registry loads ``Qcow2Driver`` from here).
Bottom up: ``layout`` (on-disk format), ``state`` (``Qcow2State``, ``L2Meta``, ``Snapshot``,
``RuntimeOptions``), ``header``, ``overlap``, ``cache``, ``refcount``, ``cluster``, ``snapshot``,
``options``, ``open``, ``compress``, ``rw``, ``resize``, ``driver`` (the ``BlockDriver`` methods), and
beside them ``check``, ``bitmap``, ``create`` (qemu-img's side).
"""

from qio.block.qcow2.driver import Qcow2Driver

__all__ = ["Qcow2Driver"]
