//! The kernel's loop-device ABI: the structs and ioctl requests of `<linux/loop.h>` (and the
//! one block-layer size request), nothing more. Safe wrappers live in the sibling modules.

pub(super) const LOOP_CONTROL: &str = "/dev/loop-control";

pub(super) const LO_NAME_SIZE: usize = 64;
pub(super) const LO_KEY_SIZE: usize = 32;
pub(super) const LO_FLAGS_READ_ONLY: u32 = 1;
pub(super) const LO_FLAGS_DIRECT_IO: u32 = 16;

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct LoopInfo64 {
    pub(super) lo_device: u64,
    pub(super) lo_inode: u64,
    pub(super) lo_rdevice: u64,
    pub(super) lo_offset: u64,
    pub(super) lo_sizelimit: u64,
    pub(super) lo_number: u32,
    pub(super) lo_encrypt_type: u32,
    pub(super) lo_encrypt_key_size: u32,
    pub(super) lo_flags: u32,
    pub(super) lo_file_name: [u8; LO_NAME_SIZE],
    pub(super) lo_crypt_name: [u8; LO_NAME_SIZE],
    pub(super) lo_encrypt_key: [u8; LO_KEY_SIZE],
    pub(super) lo_init: [u64; 2],
}

#[repr(C)]
pub(super) struct LoopConfig {
    pub(super) fd: u32,
    pub(super) block_size: u32,
    pub(super) info: LoopInfo64,
    pub(super) reserved: [u64; 8],
}

nix::ioctl_none_bad!(ctl_get_free, 0x4C82);
nix::ioctl_write_int_bad!(ctl_add, 0x4C80);
nix::ioctl_write_int_bad!(ctl_remove, 0x4C81);
nix::ioctl_write_ptr_bad!(configure, 0x4C0A, LoopConfig);
nix::ioctl_write_int_bad!(set_fd, 0x4C00);
nix::ioctl_write_ptr_bad!(set_status64, 0x4C04, LoopInfo64);
nix::ioctl_read_bad!(get_status64, 0x4C05, LoopInfo64);
nix::ioctl_none_bad!(clr_fd, 0x4C01);
nix::ioctl_none_bad!(set_capacity, 0x4C07);
nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_structs_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
