"""SCSI for the drivers: command blocks, reply parsers, sense data, and the SG_IO call.

* :mod:`.cdb` builds command descriptor blocks and names operation codes;
* :mod:`.replies` parses what devices send back (INQUIRY, VPD pages, READ
  CAPACITY, event status, TOC, REPORT LUNS);
* :mod:`.sense` names status bytes, decodes fixed and descriptor sense data and
  turns failures into :class:`ScsiCommandError`;
* :mod:`.sgio` performs one SG_IO ioctl, the only module here that does I/O.

Used by the ``host_cdrom`` driver (tray and lock commands the cdrom layer
refuses) and the ``sg`` driver (everything).  May import only ``devices.base``,
``devices._ioctl`` and ``devices._aligned_io``.
"""

from __future__ import annotations

from blockd.devices.scsi.cdb import *  # noqa: F403
from blockd.devices.scsi.cdb import __all__ as _cdb_all
from blockd.devices.scsi.replies import *  # noqa: F403
from blockd.devices.scsi.replies import __all__ as _replies_all
from blockd.devices.scsi.sense import *  # noqa: F403
from blockd.devices.scsi.sense import __all__ as _sense_all
from blockd.devices.scsi.sgio import *  # noqa: F403
from blockd.devices.scsi.sgio import __all__ as _sgio_all

__all__ = [*_cdb_all, *_replies_all, *_sense_all, *_sgio_all]
