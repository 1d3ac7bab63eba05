# Opt-in boot for a kernel built without ublk (Debian 12's own 6.1:
# VRAMBLK_VM_KERNEL=6.1 VRAMBLK_VM_SUITE=refuse): vramblk must refuse it
# with one sentence that names what the kernel lacks.
. /lib/vm/lib.sh
info "kernel $(uname -r)"
check "this kernel's build has no ublk_drv module" sh -c "! [ -e /lib/modules/ublk_drv.ko ]"
check "its config says so" grep -q "^# CONFIG_BLK_DEV_UBLK is not set" /boot/config-$(uname -r)
expect_err "add refuses it, naming what the kernel lacks" "built without CONFIG_BLK_DEV_UBLK" \
    vramblk add --size 64M --backend host
expect_err "list says the same" "built without CONFIG_BLK_DEV_UBLK" vramblk list
expect_err "features says the same" "built without CONFIG_BLK_DEV_UBLK" vramblk features
