"""blkdebug event names (QAPI ``BlkdebugEvent`` of QEMU 7.2, in enum order).

Format drivers raise these on their ``file`` child; the generic request path raises the
``pwritev*``/``flush_to_*`` ones.  Only a blkdebug node reacts; every other node ignores them.
"""

from __future__ import annotations

from enum import StrEnum


class Event(StrEnum):
    L1_UPDATE = "l1_update"
    L1_GROW_ALLOC_TABLE = "l1_grow_alloc_table"
    L1_GROW_WRITE_TABLE = "l1_grow_write_table"
    L1_GROW_ACTIVATE_TABLE = "l1_grow_activate_table"
    L2_LOAD = "l2_load"
    L2_UPDATE = "l2_update"
    L2_UPDATE_COMPRESSED = "l2_update_compressed"
    L2_ALLOC_COW_READ = "l2_alloc_cow_read"
    L2_ALLOC_WRITE = "l2_alloc_write"
    READ_AIO = "read_aio"
    READ_BACKING_AIO = "read_backing_aio"
    READ_COMPRESSED = "read_compressed"
    WRITE_AIO = "write_aio"
    WRITE_COMPRESSED = "write_compressed"
    VMSTATE_LOAD = "vmstate_load"
    VMSTATE_SAVE = "vmstate_save"
    COW_READ = "cow_read"
    COW_WRITE = "cow_write"
    REFTABLE_LOAD = "reftable_load"
    REFTABLE_GROW = "reftable_grow"
    REFTABLE_UPDATE = "reftable_update"
    REFBLOCK_LOAD = "refblock_load"
    REFBLOCK_UPDATE = "refblock_update"
    REFBLOCK_UPDATE_PART = "refblock_update_part"
    REFBLOCK_ALLOC = "refblock_alloc"
    REFBLOCK_ALLOC_HOOKUP = "refblock_alloc_hookup"
    REFBLOCK_ALLOC_WRITE = "refblock_alloc_write"
    REFBLOCK_ALLOC_WRITE_BLOCKS = "refblock_alloc_write_blocks"
    REFBLOCK_ALLOC_WRITE_TABLE = "refblock_alloc_write_table"
    REFBLOCK_ALLOC_SWITCH_TABLE = "refblock_alloc_switch_table"
    CLUSTER_ALLOC = "cluster_alloc"
    CLUSTER_ALLOC_BYTES = "cluster_alloc_bytes"
    CLUSTER_FREE = "cluster_free"
    FLUSH_TO_OS = "flush_to_os"
    FLUSH_TO_DISK = "flush_to_disk"
    PWRITEV_RMW_HEAD = "pwritev_rmw_head"
    PWRITEV_RMW_AFTER_HEAD = "pwritev_rmw_after_head"
    PWRITEV_RMW_TAIL = "pwritev_rmw_tail"
    PWRITEV_RMW_AFTER_TAIL = "pwritev_rmw_after_tail"
    PWRITEV = "pwritev"
    PWRITEV_ZERO = "pwritev_zero"
    PWRITEV_DONE = "pwritev_done"
    EMPTY_IMAGE_PREPARE = "empty_image_prepare"
    L1_SHRINK_WRITE_TABLE = "l1_shrink_write_table"
    L1_SHRINK_FREE_L2_CLUSTERS = "l1_shrink_free_l2_clusters"
    COR_WRITE = "cor_write"
    CLUSTER_ALLOC_SPACE = "cluster_alloc_space"
    NONE = "none"


EVENT_NAMES = {e.value: e for e in Event}
