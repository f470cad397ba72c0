//! Staging and target paths from requests: confined to the kubelet
//! directory and resolved without following symbolic links.
//!
//! A path is opened as an `O_PATH` file descriptor with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`) from the kubelet directory, and
//! mounts go through `/proc/self/fd/N`, so a symlink swapped in along the
//! way can never redirect a mount or an unmount elsewhere.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;

use crate::error::{Error, IoContext, Result};
use crate::node::mount::{self, PathState};

/// The directory every staging and target path must lie below.
#[derive(Clone)]
pub struct KubeletDir {
    root: PathBuf,
    fd: Arc<OwnedFd>,
}

impl std::fmt::Debug for KubeletDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("KubeletDir").field(&self.root).finish()
    }
}

impl KubeletDir {
    /// Open the directory the operator named (symlinks in the flag itself are
    /// the operator's choice and followed).
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_absolute() {
            return Err(Error::invalid(format!(
                "--kubelet-dir must be an absolute path, got {}",
                root.display()
            )));
        }
        let fd = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            Error::Precondition(format!(
                "kubelet directory {} cannot be opened ({e}); set --kubelet-dir to the kubelet's root directory",
                root.display()
            ))
        })?;
        Ok(KubeletDir {
            root: root.to_owned(),
            fd: Arc::new(fd),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Refuse to serve unless mounts made below the directory reach the
    /// kubelet and the pods: the mount holding it must be shared.
    pub fn ensure_shared(&self) -> Result<()> {
        let state = mount::path_state(self.fd.as_fd(), &self.root)?;
        let entry = mount::mounts()?
            .into_iter()
            .find(|m| m.mount_id == state.mount_id)
            .ok_or_else(|| {
                Error::Internal(format!(
                    "the mount holding {} (ID {}) is missing from mountinfo",
                    self.root.display(),
                    state.mount_id
                ))
            })?;
        if entry.shared {
            return Ok(());
        }
        Err(Error::Precondition(format!(
            "mount propagation is not shared: {} lies on the mount at {}, which is not a shared mount, \
             so volumes mounted there would stay invisible to pods. Mount the kubelet directory \
             with mountPropagation: Bidirectional (or run `mount --make-rshared {}` on the host)",
            self.root.display(),
            entry.mount_point.display(),
            entry.mount_point.display()
        )))
    }

    /// A request path as a path below this directory, or INVALID_ARGUMENT.
    pub fn locate(&self, path: &Path, field: &str) -> Result<HostPath> {
        let outside = || {
            Error::invalid(format!(
                "{field} {} is outside the kubelet directory {}",
                path.display(),
                self.root.display()
            ))
        };
        let relative = path.strip_prefix(&self.root).map_err(|_| outside())?;
        let normal = relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if !normal || relative.as_os_str().is_empty() {
            return Err(outside());
        }
        Ok(HostPath {
            root: self.fd.clone(),
            relative: relative.to_owned(),
            full: path.to_owned(),
        })
    }
}

fn is_symlink(dir: &OwnedFd, name: &OsStr) -> bool {
    nix::sys::stat::fstatat(dir.as_fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
}

/// One path below the kubelet directory.
#[derive(Clone)]
pub struct HostPath {
    root: Arc<OwnedFd>,
    relative: PathBuf,
    full: PathBuf,
}

impl std::fmt::Debug for HostPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HostPath").field(&self.full).finish()
    }
}

/// An `O_PATH` descriptor as a path the mount calls accept.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

impl HostPath {
    pub fn path(&self) -> &Path {
        &self.full
    }

    /// A path below this one (e.g. the Block staging file).
    pub fn join(&self, name: &str) -> HostPath {
        HostPath {
            root: self.root.clone(),
            relative: self.relative.join(name),
            full: self.full.join(name),
        }
    }

    fn name(&self) -> &OsStr {
        // `locate` guarantees at least one normal component.
        self.relative
            .file_name()
            .unwrap_or(self.relative.as_os_str())
    }

    fn resolve_error(&self, errno: Errno) -> Error {
        match errno {
            Errno::ELOOP => Error::invalid(format!(
                "{} contains a symbolic link; staging and target paths must not",
                self.full.display()
            )),
            Errno::EXDEV => Error::invalid(format!(
                "{} escapes the kubelet directory",
                self.full.display()
            )),
            Errno::ENOTDIR => Error::invalid(format!(
                "a parent of {} is not a directory",
                self.full.display()
            )),
            e => Error::io("open", self.full.clone(), e.into()),
        }
    }

    fn open_beneath(&self, relative: &Path, flags: OFlag) -> Result<Option<OwnedFd>> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        let target = if relative.as_os_str().is_empty() {
            Path::new(".")
        } else {
            relative
        };
        match openat2(self.root.as_fd(), target, how) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(self.resolve_error(e)),
        }
    }

    /// The path itself (the top mount on it, if any); `None` if absent.
    pub fn open(&self) -> Result<Option<OwnedFd>> {
        self.open_beneath(&self.relative, OFlag::empty())
    }

    fn parent(&self) -> Result<Option<OwnedFd>> {
        let parent = self.relative.parent().unwrap_or(Path::new(""));
        self.open_beneath(parent, OFlag::O_DIRECTORY)
    }

    /// What is at the path now (`None`: nothing there).
    pub fn state(&self) -> Result<Option<PathState>> {
        match self.open()? {
            Some(fd) => Ok(Some(mount::path_state(fd.as_fd(), &self.full)?)),
            None => Ok(None),
        }
    }

    /// The visible mount at the path, if the path is a mount point.
    pub fn mount_state(&self) -> Result<Option<PathState>> {
        Ok(self.state()?.filter(|s| s.mount_root))
    }

    /// Create the directory and its parents (below the kubelet directory).
    pub fn ensure_dir(&self) -> Result<OwnedFd> {
        let mut dir = self
            .open_beneath(Path::new(""), OFlag::O_DIRECTORY)?
            .ok_or_else(|| Error::NotFound("kubelet directory vanished".to_owned()))?;
        let mut walked = PathBuf::new();
        for component in self.relative.components() {
            walked.push(component);
            let name = component.as_os_str();
            match nix::sys::stat::mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(0o750)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => {
                    return Err(Error::io(
                        "create directory",
                        self.root_join(&walked),
                        e.into(),
                    ))
                }
            }
            dir = match openat(
                dir.as_fd(),
                name,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) {
                Ok(next) => next,
                // O_NOFOLLOW with O_DIRECTORY answers ENOTDIR for a symlink: say which.
                Err(Errno::ENOTDIR) if is_symlink(&dir, name) => {
                    return Err(self.resolve_error(Errno::ELOOP))
                }
                Err(e) => return Err(self.resolve_error(e)),
            };
        }
        Ok(dir)
    }

    fn root_join(&self, relative: &Path) -> PathBuf {
        let depth = self.relative.components().count();
        let mut base = self.full.clone();
        for _ in 0..depth {
            base.pop();
        }
        base.join(relative)
    }

    /// Create an empty file (a Block bind target) and its parents.
    pub fn ensure_file(&self) -> Result<()> {
        let parent_rel = self.relative.parent().unwrap_or(Path::new(""));
        let parent = if parent_rel.as_os_str().is_empty() {
            self.open_beneath(Path::new(""), OFlag::O_DIRECTORY)?
                .ok_or_else(|| Error::NotFound("kubelet directory vanished".to_owned()))?
        } else {
            self.with_relative(parent_rel).ensure_dir()?
        };
        match openat(
            parent.as_fd(),
            self.name(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        ) {
            Ok(_) => Ok(()),
            Err(Errno::EEXIST) => self.open().map(|_| ()),
            Err(e) => Err(self.resolve_error(e)),
        }
    }

    fn with_relative(&self, relative: &Path) -> HostPath {
        HostPath {
            root: self.root.clone(),
            relative: relative.to_owned(),
            full: self.root_join(relative),
        }
    }

    /// Mount a filesystem from `device` here.
    pub fn mount_device(
        &self,
        device: &Path,
        fs_type: &str,
        options: &mount::MountOptions,
    ) -> Result<()> {
        let fd = self.open()?.ok_or_else(|| self.missing())?;
        let data = options.data.join(",");
        let data = (!data.is_empty()).then_some(data.as_str());
        mount(
            Some(device),
            &fd_path(&fd),
            Some(fs_type),
            options.flags,
            data,
        )
        .ctx("mount", self.full.clone())
    }

    /// Bind `source` here; a read-only or flagged bind needs a second, remounting call.
    pub fn bind_from(&self, source: &Path, read_only: bool, extra: MsFlags) -> Result<()> {
        let fd = self.open()?.ok_or_else(|| self.missing())?;
        mount(
            Some(source),
            &fd_path(&fd),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .ctx("bind mount", self.full.clone())?;
        drop(fd);
        let remount_flags = extra
            | if read_only {
                MsFlags::MS_RDONLY
            } else {
                MsFlags::empty()
            };
        if remount_flags.is_empty() {
            return Ok(());
        }
        let remounted = self.open()?.ok_or_else(|| self.missing()).and_then(|fd| {
            let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | remount_flags;
            mount(
                None::<&str>,
                &fd_path(&fd),
                None::<&str>,
                flags,
                None::<&str>,
            )
            .ctx("remount", self.full.clone())
        });
        if remounted.is_err() {
            let _ = self.unmount_top();
        }
        remounted
    }

    /// Bind the mount visible at `source` (a staging path) here.
    pub fn bind_from_path(&self, source: &HostPath, read_only: bool, extra: MsFlags) -> Result<()> {
        let fd = source.open()?.ok_or_else(|| source.missing())?;
        self.bind_from(&fd_path(&fd), read_only, extra)
    }

    fn missing(&self) -> Error {
        Error::NotFound(format!("{} does not exist", self.full.display()))
    }

    /// Unmount the top mount here; `false` if the path is not a mount point.
    fn unmount_top(&self) -> Result<bool> {
        let Some(parent) = self.parent()? else {
            return Ok(false);
        };
        let mounted = match openat(
            parent.as_fd(),
            self.name(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => mount::path_state(fd.as_fd(), &self.full)?.mount_root,
            Err(Errno::ENOENT) => false,
            Err(e) => return Err(self.resolve_error(e)),
        };
        if !mounted {
            return Ok(false);
        }
        // Through the parent's descriptor: the last component is looked up
        // without following a symlink, and our descriptor does not pin the mount.
        let at = fd_path(&parent).join(self.name());
        match mount::unmount_nofollow_when_idle(&at) {
            Ok(()) => Ok(true),
            Err(Errno::EINVAL | Errno::ENOENT) => Ok(false),
            Err(e) => Err(Error::io("unmount", self.full.clone(), e.into())),
        }
    }

    /// Unmount everything stacked here. Not mounted is fine.
    pub fn unmount_all(&self) -> Result<()> {
        // Bounded: a path can only hold so many stacked mounts.
        for _ in 0..64 {
            if !self.unmount_top()? {
                return Ok(());
            }
        }
        Err(Error::Internal(format!(
            "{} still mounted after 64 unmounts",
            self.full.display()
        )))
    }

    /// Remove a file or an empty directory we created; absent is fine.
    pub fn remove(&self) -> Result<()> {
        let Some(parent) = self.parent()? else {
            return Ok(());
        };
        let stat = match nix::sys::stat::fstatat(
            parent.as_fd(),
            self.name(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(Error::io("stat", self.full.clone(), e.into())),
        };
        let is_dir = stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let flag = if is_dir {
            nix::unistd::UnlinkatFlags::RemoveDir
        } else {
            nix::unistd::UnlinkatFlags::NoRemoveDir
        };
        match nix::unistd::unlinkat(parent.as_fd(), self.name(), flag) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(Error::io("remove", self.full.clone(), e.into())),
        }
    }
}
