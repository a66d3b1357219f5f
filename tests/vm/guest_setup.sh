#!/bin/sh
# Runs in the guest before the inner pytest (tests/vm/guest.py): the kernel drivers the
# VM tier exercises, a running udevd, and blockd's udev rules when the tree has any.
#   sh tests/vm/guest_setup.sh ROOT
set -u
root=${1:-$(dirname "$0")/../..}

for module in sr_mod sg virtio_scsi ata_piix ahci; do
    modprobe -q "$module" 2>/dev/null || echo "guest-setup: cannot load $module (built in?)" >&2
done

if ! pgrep -x systemd-udevd >/dev/null 2>&1; then
    echo "guest-setup: starting systemd-udevd" >&2
    /lib/systemd/systemd-udevd --daemon
    udevadm trigger --action=add
fi

found=0
for rules in "$root"/contrib/udev/*.rules; do
    [ -f "$rules" ] || continue
    mkdir -p /run/udev/rules.d
    cp "$rules" /run/udev/rules.d/
    echo "guest-setup: installed $(basename "$rules") into /run/udev/rules.d" >&2
    found=1
done
if [ "$found" -eq 1 ]; then
    udevadm control --reload
    udevadm trigger --action=change --subsystem-match=block
fi
udevadm settle --timeout=60 || echo "guest-setup: udevadm settle timed out" >&2
exit 0
