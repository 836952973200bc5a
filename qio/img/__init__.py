"""``qio-img``: the ``create``, ``check``, ``info`` and ``map`` commands of qemu-img 7.2 on qio's block layer."""
