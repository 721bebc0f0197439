//! The `namespace` sandbox's files, prepared by the helper as root on the host before the
//! sandbox exists: the overlay's folders, the masks and scrubbed files in its upper layer, and
//! the workspace given to the sandbox's ids.
//!
//! Everything here runs as host root over folders a build may have shaped (the upper layer of
//! an earlier session, the workspace): no step may follow a link the build left.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::isolate::{HOST_ID_BASE, ID_COUNT, c_path, os_error};

/// Masked whatever the node asks: home folders, and the host's own secrets, which root inside
/// could otherwise read, since the idmapped lower layer shows the host's root-owned files as
/// its own. This is a deny list, so it cannot be complete: a root folder from an image is the
/// stronger answer.
pub(crate) fn default_masks() -> Vec<PathBuf> {
    let mut masks: Vec<PathBuf> = [
        "/root",
        "/home",
        "/etc/ssl/private",
        "/var/backups",
        "/var/lib/docker",
        "/var/lib/containerd",
        "/var/log",
        "/var/mail",
        "/var/spool/cron",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    // The SSH host keys go, but not the client configuration builds use for git over SSH.
    if let Ok(entries) = fs::read_dir("/etc/ssh") {
        masks.extend(
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("ssh_host_"))
                .map(|e| e.path()),
        );
    }
    masks
}

/// Password databases: the build sees them (tools such as `useradd` need them) with every
/// password hash replaced by `*`.
pub(crate) const SCRUBBED: [&str; 4] = [
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
];

/// Puts a copy of `path` without password hashes in the upper layer, unless the upper layer
/// already has the file (written by an earlier session from such a copy).
pub(crate) fn scrub_in_upper(upper: &Path, path: &Path) -> Result<(), String> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    let target = upper.join(path.strip_prefix("/").unwrap_or(path));
    if fs::symlink_metadata(&target).is_ok() {
        return Ok(());
    }
    // A folder the build replaced (by a link, say) already hides the host's file; and the
    // file is created, never opened, so no link the build left is ever followed.
    if let Some(parent) = path.parent()
        && !make_parents(upper, parent)?
    {
        return Ok(());
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&target)
        .map_err(|e| format!("cannot write {}: {e}", target.display()))?;
    file.write_all(scrub(&text).as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", target.display()))?;
    shift_owner(&target, path)
}

/// Replaces the second field (the hash) of every `name:hash:...` line by `*`.
fn scrub(text: &str) -> String {
    text.lines()
        .map(|line| match line.split_once(':') {
            Some((name, rest)) => {
                let after = rest.split_once(':').map_or("", |(_, after)| after);
                format!("{name}:*:{after}\n")
            }
            None => format!("{line}\n"),
        })
        .collect()
}

/// Paths must be absolute: they are resolved again inside the sandbox's root.
pub(crate) fn check_path(what: &str, path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!(
            "{what} {} must be an absolute path",
            path.display()
        ));
    }
    Ok(())
}

/// The session's scratch folders.
pub(crate) struct Layout {
    pub(crate) base: PathBuf,
    pub(crate) upper: PathBuf,
    pub(crate) work: PathBuf,
    pub(crate) lower: PathBuf,
    pub(crate) root: PathBuf,
}

impl Layout {
    pub(crate) fn create(base: &Path) -> Result<Layout, String> {
        let layout = Layout {
            base: base.to_owned(),
            upper: base.join("upper"),
            work: base.join("work"),
            lower: base.join("lower"),
            root: base.join("root"),
        };
        for dir in [
            base,
            &layout.work,
            &layout.lower,
            &layout.root,
            &layout.upper,
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        // The upper folder's own attributes are those of `/` inside: root's, world-readable.
        shift_owner(&layout.upper, Path::new("/"))?;
        layout.clear_volatile_marker()?;
        Ok(layout)
    }

    /// The overlay is mounted `volatile` (see `isolate.rs`), so overlayfs leaves
    /// `work/work/incompat/volatile` behind and refuses the next mount while it is there: after a
    /// crash the upper layer may have lost writes. The marker is removed when a session of this
    /// boot left it (the boot id written beside the layers says so); one from before a reboot
    /// stays, and the session cannot start.
    fn clear_volatile_marker(&self) -> Result<(), String> {
        let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map_err(|e| format!("cannot read the boot id: {e}"))?;
        let stamp = self.base.join("boot-id");
        let stamped = fs::read_to_string(&stamp).ok();
        let marker = self.work.join("work/incompat/volatile");
        if marker.symlink_metadata().is_ok() {
            if stamped.as_deref() != Some(boot.as_str()) {
                return Err(format!(
                    "the sandbox's upper layer {} was in use when the machine stopped, and may \
                     have lost writes; remove the build's folder",
                    self.upper.display()
                ));
            }
            fs::remove_dir_all(&marker)
                .map_err(|e| format!("cannot remove {}: {e}", marker.display()))?;
        }
        if stamped.as_deref() != Some(boot.as_str()) {
            fs::write(&stamp, &boot)
                .map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
        }
        Ok(())
    }
}

/// Hides a host path: an opaque folder in the upper layer for a folder (what the build writes
/// there stays in the upper layer), a whiteout for anything else.
pub(crate) fn mask_in_upper(upper: &Path, path: &Path) -> Result<(), String> {
    check_path("a masked path", path)?;
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    let relative = path.strip_prefix("/").unwrap_or(path);
    let target = upper.join(relative);
    if let Some(parent) = path.parent()
        && !make_parents(upper, parent)?
    {
        return Ok(());
    }
    if meta.is_dir() {
        match fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => remove(&target)?,
            Err(_) => {}
        }
        if !target.exists() {
            fs::create_dir(&target)
                .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
            shift_owner(&target, path)?;
        }
        set_opaque(&target)
    } else {
        if fs::symlink_metadata(&target).is_ok() {
            remove(&target)?;
        }
        whiteout(&target)
    }
}

/// Creates the folders of host path `dir` in the upper layer, each with its host attributes,
/// so they merge with the lower folders. False when one is not a folder in the upper layer
/// (the build replaced it), and so already hides the host's.
fn make_parents(upper: &Path, dir: &Path) -> Result<bool, String> {
    let mut host = PathBuf::from("/");
    let mut in_upper = upper.to_owned();
    for component in dir.strip_prefix("/").unwrap_or(dir).components() {
        host.push(component);
        in_upper.push(component);
        match fs::symlink_metadata(&in_upper) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Ok(false),
            Err(_) => {
                fs::create_dir(&in_upper)
                    .map_err(|e| format!("cannot create {}: {e}", in_upper.display()))?;
                shift_owner(&in_upper, &host)?;
            }
        }
    }
    Ok(true)
}

fn remove(path: &Path) -> Result<(), String> {
    let removed = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        _ => fs::remove_file(path),
    };
    removed.map_err(|e| format!("cannot remove {}: {e}", path.display()))
}

/// Gives `path` the mode of `like` on the host and its owner as seen inside the sandbox.
fn shift_owner(path: &Path, like: &Path) -> Result<(), String> {
    let meta = fs::metadata(like).map_err(|e| format!("cannot read {}: {e}", like.display()))?;
    let (uid, gid) = (shift(meta.uid()), shift(meta.gid()));
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|e| format!("cannot chown {}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))
}

/// Gives the workspace's files to the sandbox's ids on disk (uid `u` becomes `100000 + u`), so
/// root inside owns what the node copied in, and whatever the build creates there is owned by
/// an unprivileged host uid: a set-uid file it leaves behind grants nothing on the host. Files
/// already shifted by an earlier session are left alone, so this costs one `lstat` per file.
///
/// A build may be running while this walks its files ([`crate::Executor::adopt`]), and could
/// swap a folder for a symbolic link to a host folder mid-walk; so the walk never follows a
/// link: `dir` is opened with `RESOLVE_NO_SYMLINKS`, every step with `O_NOFOLLOW` relative to
/// its parent's descriptor, and every change with `AT_SYMLINK_NOFOLLOW`.
pub(crate) fn shift_tree(dir: &Path) -> Result<(), String> {
    let root = open_beneath_no_symlinks(dir)?;
    // Each entry: the folder holding it (kept open while it has entries to visit) and its name;
    // depth first, so at most one open folder per level.
    let mut pending: Vec<(std::rc::Rc<OwnedFd>, CString)> = Vec::new();
    let mut current = Some(root);
    loop {
        if let Some(folder) = current.take() {
            shift_fd(&folder, dir)?;
            let folder = std::rc::Rc::new(folder);
            for name in entries(&folder, dir)? {
                pending.push((folder.clone(), name));
            }
        }
        let Some((parent, name)) = pending.pop() else {
            return Ok(());
        };
        let mut stat: libc::stat = unsafe_zeroed_stat();
        // SAFETY: fstatat writes only to `stat`; the name is NUL-terminated.
        let found = unsafe {
            libc::fstatat(
                parent.as_raw_fd(),
                name.as_ptr(),
                &mut stat,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if found < 0 {
            // Removed by the build meanwhile: nothing to give.
            continue;
        }
        if stat.st_mode & libc::S_IFMT == libc::S_IFDIR {
            // SAFETY: openat returns a new descriptor or -1; O_NOFOLLOW refuses a swapped link.
            let fd = unsafe {
                libc::openat(
                    parent.as_raw_fd(),
                    name.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: `fd` is a fresh descriptor owned by nobody else.
                current = Some(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        } else if let Some((uid, gid)) = shifted(stat.st_uid, stat.st_gid) {
            // SAFETY: fchownat with AT_SYMLINK_NOFOLLOW changes the entry itself, never a
            // link's target.
            let changed = unsafe {
                libc::fchownat(
                    parent.as_raw_fd(),
                    name.as_ptr(),
                    uid,
                    gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if changed < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT) {
                return Err(os_error(&format!("cannot give files in {}", dir.display())));
            }
        }
    }
}

fn unsafe_zeroed_stat() -> libc::stat {
    // SAFETY: `stat` is plain data for which all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Whether the folder `dir` itself already belongs to the sandbox's range.
pub(crate) fn is_given(dir: &Path) -> bool {
    fs::symlink_metadata(dir).is_ok_and(|meta| meta.uid() >= ID_COUNT && meta.gid() >= ID_COUNT)
}

/// The owner a file gets in the sandbox's range, if it is not there yet.
fn shifted(uid: u32, gid: u32) -> Option<(u32, u32)> {
    if uid >= ID_COUNT && gid >= ID_COUNT {
        return None;
    }
    let each = |id: u32| if id < ID_COUNT { shift(id) } else { id };
    Some((each(uid), each(gid)))
}

/// Shifts the owner of the open folder itself.
fn shift_fd(folder: &OwnedFd, dir: &Path) -> Result<(), String> {
    let mut stat = unsafe_zeroed_stat();
    // SAFETY: fstat writes only to `stat`.
    if unsafe { libc::fstat(folder.as_raw_fd(), &mut stat) } < 0 {
        return Err(os_error(&format!("cannot read {}", dir.display())));
    }
    if let Some((uid, gid)) = shifted(stat.st_uid, stat.st_gid) {
        // SAFETY: fchown changes the open folder's owner.
        if unsafe { libc::fchown(folder.as_raw_fd(), uid, gid) } < 0 {
            return Err(os_error(&format!("cannot give {}", dir.display())));
        }
    }
    Ok(())
}

/// The names in an open folder (without `.` and `..`).
fn entries(folder: &OwnedFd, dir: &Path) -> Result<Vec<CString>, String> {
    // SAFETY: fdopendir takes ownership of the duplicate, which closedir closes; readdir's
    // entries are copied out before the next call.
    unsafe {
        let copy = libc::fcntl(folder.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0);
        if copy < 0 {
            return Err(os_error(&format!("cannot list {}", dir.display())));
        }
        let stream = libc::fdopendir(copy);
        if stream.is_null() {
            libc::close(copy);
            return Err(os_error(&format!("cannot list {}", dir.display())));
        }
        let mut names = Vec::new();
        loop {
            let entry = libc::readdir64(stream);
            if entry.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*entry).d_name.as_ptr());
            if name != c"." && name != c".." {
                names.push(name.to_owned());
            }
        }
        libc::closedir(stream);
        Ok(names)
    }
}

/// `struct open_how` of `openat2(2)`.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_SYMLINKS: u64 = 0x04;

/// Opens the folder `dir` through no symbolic link at all.
fn open_beneath_no_symlinks(dir: &Path) -> Result<OwnedFd, String> {
    let c = c_path(dir)?;
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_NO_SYMLINKS,
    };
    // SAFETY: openat2 reads the path and `how` (its size is passed) and returns a descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(os_error(&format!(
            "cannot open {} without following links",
            dir.display()
        )));
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A host id as the idmapped lower layer shows it (ids past the map show as `nobody`).
fn shift(id: u32) -> u32 {
    if id < ID_COUNT {
        HOST_ID_BASE + id
    } else {
        65_534
    }
}

fn set_opaque(dir: &Path) -> Result<(), String> {
    let path = c_path(dir)?;
    // SAFETY: both strings are NUL-terminated and outlive the call.
    let done = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            c"y".as_ptr().cast(),
            1,
            0,
        )
    };
    if done < 0 {
        return Err(os_error(&format!("cannot mask {}", dir.display())));
    }
    Ok(())
}

/// An overlay whiteout: a character device 0:0 hides the lower file of the same name.
fn whiteout(path: &Path) -> Result<(), String> {
    let c = c_path(path)?;
    // SAFETY: the path is NUL-terminated; mknod creates one node.
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) } < 0 {
        return Err(os_error(&format!("cannot mask {}", path.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubbing_removes_every_hash() {
        let shadow = "root:$6$salt$hash:20228:0:99999:7:::\nnobody:*:1::::::\nodd\n";
        assert_eq!(
            scrub(shadow),
            "root:*:20228:0:99999:7:::\nnobody:*:1::::::\nodd\n"
        );
        assert_eq!(scrub("group:!:root:\n"), "group:*:root:\n");
    }

    #[test]
    fn the_volatile_marker_is_cleared_only_when_this_boot_left_it() {
        let base = std::env::temp_dir().join(format!("pb-volatile-{}", std::process::id()));
        let layout = Layout {
            base: base.clone(),
            upper: base.join("upper"),
            work: base.join("work"),
            lower: base.join("lower"),
            root: base.join("root"),
        };
        let marker = layout.work.join("work/incompat/volatile");
        fs::create_dir_all(&base).expect("mkdir");
        // A first session finds no marker and stamps the boot.
        layout.clear_volatile_marker().expect("nothing to clear");
        let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
        assert_eq!(
            fs::read_to_string(base.join("boot-id")).expect("stamp"),
            boot
        );
        // The marker a session of this boot left goes.
        fs::create_dir_all(&marker).expect("mkdir");
        fs::write(marker.join("dirty"), "").expect("write");
        layout.clear_volatile_marker().expect("cleared");
        assert!(!marker.exists());
        // One from another boot stays, and the session does not start.
        fs::create_dir_all(&marker).expect("mkdir");
        fs::write(base.join("boot-id"), "another boot\n").expect("write");
        let refused = layout.clear_volatile_marker().expect_err("refused");
        assert!(refused.contains("may have lost writes"), "{refused}");
        assert!(marker.exists());
        fs::remove_dir_all(&base).expect("clean up");
    }

    #[test]
    fn relative_paths_are_refused() {
        assert!(check_path("x", Path::new("/a,b:c")).is_ok());
        assert!(check_path("x", Path::new("a/b")).is_err());
    }

    #[test]
    fn shifting_a_tree_gives_it_to_the_sandbox_once() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: giving files to other users needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("pb-shift-{}", std::process::id()));
        fs::create_dir_all(dir.join("sub")).expect("mkdir");
        fs::write(dir.join("sub/file"), "x").expect("write");
        std::os::unix::fs::symlink("file", dir.join("sub/link")).expect("symlink");
        let outside = std::env::temp_dir().join(format!("pb-shift-out-{}", std::process::id()));
        fs::create_dir_all(&outside).expect("mkdir");
        fs::write(outside.join("host-file"), "x").expect("write");
        std::os::unix::fs::symlink(&outside, dir.join("escape")).expect("symlink");
        std::os::unix::fs::lchown(dir.join("sub/file"), Some(1000), Some(ID_COUNT + 5))
            .expect("chown");
        shift_tree(&dir).expect("shifted");
        shift_tree(&dir).expect("shifting again changes nothing");
        let owner = |path: &str| {
            let meta = fs::symlink_metadata(dir.join(path)).expect("stat");
            (meta.uid(), meta.gid())
        };
        assert_eq!(owner(""), (HOST_ID_BASE, HOST_ID_BASE));
        assert_eq!(owner("sub/link"), (HOST_ID_BASE, HOST_ID_BASE));
        assert_eq!(owner("sub/file"), (HOST_ID_BASE + 1000, ID_COUNT + 5));
        let host_file = fs::metadata(outside.join("host-file")).expect("stat");
        assert_eq!(
            (host_file.uid(), host_file.gid()),
            (0, 0),
            "followed a link out"
        );
        assert!(
            shift_tree(&dir.join("escape")).is_err(),
            "opened through a link"
        );
        fs::remove_dir_all(&dir).expect("clean up");
        fs::remove_dir_all(&outside).expect("clean up");
    }

    #[test]
    fn ids_shift_into_the_sandbox_range() {
        assert_eq!(shift(0), HOST_ID_BASE);
        assert_eq!(shift(1000), HOST_ID_BASE + 1000);
        assert_eq!(shift(ID_COUNT), 65_534);
    }
}
