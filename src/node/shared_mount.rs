//! A directory made a shared mount for the driver's mount-propagation check, where no kubelet
//! made one: the demo, the benchmark and the tests.

use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

use crate::error::{IoContext, Result};
use crate::node::host_path::KubeletDir;
use crate::node::mount;

/// A directory on a shared mount, so that it passes the driver's
/// mount-propagation check wherever it lies (demo, benchmark, tests): if the
/// mount holding it is not shared already, it is bind-mounted onto itself
/// and made shared, and unmounted again on drop.
pub struct SharedMount {
    path: PathBuf,
    mounted: bool,
}

impl SharedMount {
    pub fn new(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path).ctx("create", path)?;
        let already = KubeletDir::open(path)
            .and_then(|dir| dir.ensure_shared())
            .is_ok();
        if already {
            return Ok(SharedMount {
                path: path.to_owned(),
                mounted: false,
            });
        }
        mount(
            Some(path),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .ctx("bind mount", path)?;
        let shared = SharedMount {
            path: path.to_owned(),
            mounted: true,
        };
        mount(
            None::<&str>,
            path,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .ctx("make shared", path)?;
        Ok(shared)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SharedMount {
    fn drop(&mut self) {
        // Not lazily: mounts still below it stay visible rather than hidden.
        if self.mounted {
            let _ = mount::unmount_nofollow_when_idle(&self.path);
        }
    }
}
