//! The helper's side of the `namespace` backend: builds the sandbox in the freshly executed,
//! single-threaded helper process, never in the node.
//!
//! The helper runs as root on the host. It prepares everything that needs host privileges (the
//! overlay's layers and masks, see `layers.rs`; the limits, see `cgroups.rs`; a user
//! namespace), then forks the sandbox's init process (pid 1 of a new pid namespace), which:
//! 1. sets rlimits where no cgroup is delegated (the helper moves init into the session's
//!    cgroups meanwhile, see [`Attacher`]);
//! 2. unshares the mount, network, IPC and UTS namespaces, still as host root, so that
//!    every mount it makes belongs to a mount namespace the build has no power over: the build
//!    can never unmount a mask; brings the loopback up and, when the session has outbound
//!    network, waits while the helper starts slirp4netns on the new network namespace (see
//!    `network.rs`);
//! 3. mounts the root: an overlay whose lower layer is the host's `/` (or an image's root
//!    folder) through an idmapped mount
//!    and whose upper layer is the session's `upper` folder (kept until the node removes it, so
//!    caches outside the workspace can be collected), then a fresh `/proc`, `/sys`, `/dev` and a
//!    private `/tmp` and `/run`, and the workspace read-write at its own path; home folders,
//!    the host's own secrets and the node's are masked by opaque folders or whiteouts in the
//!    upper layer, and password hashes are scrubbed;
//! 4. pivots into that root, waits until the helper has moved it into the session's cgroups,
//!    unshares the cgroup namespace, joins the user namespace the helper made (root inside is uid
//!    [`HOST_ID_BASE`] on the host), checks that every namespace really is new, and starts the
//!    shell. When the shell exits, init exits, and the kernel kills everything else in the pid
//!    namespace.
//!
//! The uid map is `0 100000 65536`: ids 0..65535 inside are 100000..165535 on the host, a range
//! no ordinary account uses (it is where Debian's `/etc/subuid` starts handing out ranges; a
//! machine that gave it to a user should not run namespace builds until this is configurable).
//! The same map is the idmap of the lower layer, so files the host's root owns look root-owned
//! inside and `apt-get install` works in the overlay. The workspace is not idmapped: its files
//! are chowned into the range on disk (see [`shift_tree`]), so nothing the build creates is ever
//! owned by a privileged host user. Neither is the upper layer, whose files are owned by the
//! range too.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::cgroups::{Applied, Cgroups};
use crate::layers::{
    Layout, SCRUBBED, check_path, default_masks, is_given, mask_in_upper, scrub_in_upper,
    shift_tree,
};
use crate::network::{Slirp, guard_unchanged, install_guard, resolv_conf_in_upper, start_slirp};

/// The host uid (and gid) that root inside the sandbox is.
pub const HOST_ID_BASE: u32 = 100_000;
/// How many ids the sandbox's user namespace maps.
pub const ID_COUNT: u32 = 65_536;

/// What the node asked of the sandbox (parsed from the helper's arguments).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Isolation {
    /// The session's scratch folder: `upper/` and `work/` of the overlay, and mount points.
    pub base: PathBuf,
    /// Host paths the build must not see.
    pub masked: Vec<PathBuf>,
    pub memory_limit_bytes: Option<u64>,
    pub process_limit: Option<u64>,
    pub network: Network,
    /// The generation of the host's nftables ruleset that the node found holding the guard
    /// (see [`crate::network::install_guard`]): while the ruleset is still at it, the guard
    /// needs no new install before slirp4netns starts.
    pub guard_generation: Option<u32>,
    /// The root folder the overlay is built over: an image's root file system, or (`None`)
    /// the host's `/`.
    pub root: Option<PathBuf>,
}

/// The sandbox's network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Network {
    /// A loopback only.
    #[default]
    Loopback,
    /// Outbound access through this slirp4netns program, behind the host's guard.
    Slirp(PathBuf),
}

/// The sandbox as started: its init's host pid, and what to clean up once it is gone.
pub struct Started {
    pub init_pid: i32,
    cgroups: Cgroups,
    pub memory: Applied,
    pub processes: Applied,
    /// The session's slirp4netns, when it has outbound network; the helper's supervision kills
    /// it with its other children, and it exits by itself once this is dropped.
    _slirp: Option<Slirp>,
}

impl Started {
    /// Removes the session's cgroups; every process in them is dead by now.
    pub fn clean_up(&self) {
        self.cgroups.remove();
    }
}

/// Who runs the shell inside, in the sandbox's own ids.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub groups: Vec<u32>,
}

/// Builds the sandbox and starts the shell in it; returns once the shell runs, or with the
/// reason it could not.
pub fn start(
    isolation: &Isolation,
    shell: &str,
    workdir: &Path,
    identity: &Identity,
) -> Result<Started, String> {
    check_path("the sandbox folder", &isolation.base)?;
    check_path("the workspace", workdir)?;
    // The first session gives the workspace to the sandbox; later ones find its root given and
    // skip the walk (what the node adds meanwhile goes through `Executor::adopt`).
    if !is_given(workdir) {
        shift_tree(workdir)?;
    }
    let layout = Layout::create(&isolation.base)?;
    // Over an image's root folder nothing of the host is there to hide (and the image's own
    // /root, /home and password files must stay as they are).
    if isolation.root.is_none() {
        for path in default_masks().iter().chain(&isolation.masked) {
            mask_in_upper(&layout.upper, path)?;
        }
        for path in SCRUBBED {
            scrub_in_upper(&layout.upper, Path::new(path))?;
        }
    }
    let uplink = match &isolation.network {
        Network::Loopback => None,
        Network::Slirp(program) => {
            resolv_conf_in_upper(&layout.upper)?;
            Some((program.as_path(), Uplink::new()?))
        }
    };
    let user_namespace = user_namespace()?;
    let host_namespaces = namespace_ids()?;
    let (report_read, report_write) = pipe()?;
    // The helper's own pid namespace, to go back to for slirp4netns once init is forked.
    let host_pid_namespace = fs::File::open("/proc/self/ns/pid")
        .map_err(|e| format!("cannot open the pid namespace: {e}"))?;
    // SAFETY: unshare only changes which pid namespace this process's next child is created in.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } < 0 {
        return Err(os_error("cannot create a pid namespace"));
    }
    let (attached_read, attached_write) = pipe()?;
    let (cgroups, memory, processes) = Cgroups::create(isolation)?;
    // SAFETY: the helper is single-threaded, so the child may do anything after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let error = os_error("cannot fork the sandbox's init");
        cgroups.remove();
        return Err(error);
    }
    if pid == 0 {
        drop(report_read);
        drop(attached_write);
        let plan = Plan {
            layout: &layout,
            root: isolation.root.as_deref().unwrap_or(Path::new("/")),
            workdir,
            shell,
            identity,
            user_namespace: &user_namespace,
            cgroups: &cgroups,
            attached: attached_read,
            host_namespaces: &host_namespaces,
            uplink: uplink.map(|(_, uplink)| uplink.into_init_side()),
        };
        init_main(&plan, report_write);
    }
    drop(report_write);
    drop(attached_read);
    // The helper's other children (the attacher, slirp4netns) live in the host's pid namespace,
    // never in the sandbox's.
    // SAFETY: setns only changes the pid namespace of this process's next children.
    let returned = if unsafe { libc::setns(host_pid_namespace.as_raw_fd(), libc::CLONE_NEWPID) } < 0
    {
        Err(os_error("cannot return to the host's pid namespace"))
    } else {
        Ok(())
    };
    // Moving init into its cgroups waits on the kernel for most of a session's start-up, so a
    // child of the helper does it while init builds the sandbox and the helper starts
    // slirp4netns; init starts nothing of the build's before it hears that the move is done.
    let attacher = returned.and_then(|()| Attacher::start(&cgroups, pid));
    let slirp = match &attacher {
        Ok(_) => uplink.and_then(|(program, uplink)| {
            connect_uplink(program, uplink, pid, isolation.guard_generation)
        }),
        Err(_) => None,
    };
    let started = Started {
        init_pid: pid,
        cgroups,
        memory,
        processes,
        _slirp: slirp,
    };
    let attached = attacher.and_then(Attacher::wait);
    let mut attached_write = fs::File::from(attached_write);
    if attached.is_ok() {
        let _ = attached_write.write_all(b"1");
    }
    // Without the byte init reads the end of the pipe and stops.
    drop(attached_write);
    let mut report = String::new();
    let _ = fs::File::from(report_read).read_to_string(&mut report);
    if let Err(reason) = attached {
        // Init may have failed first, on its own (and so left nothing to move).
        if report.is_empty() || report == NOT_ATTACHED {
            report = reason;
        }
    }
    if report == "ok" {
        return Ok(started);
    }
    // SAFETY: kill only sends a signal to our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut status = 0;
    // SAFETY: waitpid writes only to `status`.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    started.clean_up();
    if report.is_empty() {
        report = "the sandbox's init died while setting up".into();
    }
    Err(report)
}

/// Makes a user namespace with the sandbox's id map and returns a descriptor that keeps it
/// alive. A child creates it, because only a process outside a namespace may write an id map
/// wider than its own id.
fn user_namespace() -> Result<OwnedFd, String> {
    let (ready_read, ready_write) = pipe()?;
    let (done_read, done_write) = pipe()?;
    // SAFETY: the helper is single-threaded; the child only calls unshare, write, read, _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os_error("cannot fork"));
    }
    if pid == 0 {
        drop(ready_read);
        drop(done_write);
        // SAFETY: async-signal-safe calls on descriptors this process owns, then _exit.
        unsafe {
            let ok = libc::unshare(libc::CLONE_NEWUSER) == 0;
            let byte = [if ok { b'1' } else { b'0' }];
            libc::write(ready_write.as_raw_fd(), byte.as_ptr().cast(), 1);
            let mut buf = [0u8; 1];
            libc::read(done_read.as_raw_fd(), buf.as_mut_ptr().cast(), 1);
            libc::_exit(0);
        }
    }
    drop(ready_write);
    drop(done_read);
    let result = (|| {
        let mut byte = [0u8; 1];
        fs::File::from(ready_read)
            .read_exact(&mut byte)
            .map_err(|e| format!("cannot create a user namespace: {e}"))?;
        if byte[0] != b'1' {
            return Err(
                "cannot create a user namespace (does this kernel allow them? see /proc/sys/user/max_user_namespaces)"
                    .to_owned(),
            );
        }
        let map = format!("0 {HOST_ID_BASE} {ID_COUNT}\n");
        for file in ["uid_map", "gid_map"] {
            fs::write(format!("/proc/{pid}/{file}"), &map)
                .map_err(|e| format!("cannot write the sandbox's {file}: {e}"))?;
        }
        let ns = fs::File::open(format!("/proc/{pid}/ns/user"))
            .map_err(|e| format!("cannot open the sandbox's user namespace: {e}"))?;
        Ok(OwnedFd::from(ns))
    })();
    drop(done_write);
    let mut status = 0;
    // SAFETY: waitpid writes only to `status`; the child exits once `done` closes.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    result
}

/// The inode numbers of this process's namespaces, to check that the sandbox's are new.
type NamespaceIds = Vec<(&'static str, u64)>;

const NAMESPACES: [&str; 6] = ["user", "mnt", "pid", "net", "ipc", "uts"];

fn namespace_ids() -> Result<NamespaceIds, String> {
    NAMESPACES
        .iter()
        .map(|ns| {
            let meta = fs::metadata(format!("/proc/self/ns/{ns}"))
                .map_err(|e| format!("cannot read the {ns} namespace: {e}"))?;
            Ok((*ns, meta.ino()))
        })
        .collect()
}

/// Everything init needs, prepared by the helper before the fork.
struct Plan<'a> {
    layout: &'a Layout,
    /// The lower layer: the host's `/` or an image's root folder.
    root: &'a Path,
    workdir: &'a Path,
    shell: &'a str,
    identity: &'a Identity,
    user_namespace: &'a OwnedFd,
    cgroups: &'a Cgroups,
    /// Readable once the helper has moved init into `cgroups` (the end of the pipe if it could
    /// not).
    attached: OwnedFd,
    host_namespaces: &'a NamespaceIds,
    /// Set when the session has outbound network: init waits on it for slirp4netns.
    uplink: Option<InitUplink>,
}

/// The two pipes through which init and the helper agree on when slirp4netns starts: init says
/// its network namespace exists, the helper answers once slirp4netns configured it (or failed).
struct Uplink {
    unshared_read: OwnedFd,
    unshared_write: OwnedFd,
    configured_read: OwnedFd,
    configured_write: OwnedFd,
}

/// Init's ends of an [`Uplink`].
struct InitUplink {
    unshared: OwnedFd,
    configured: OwnedFd,
}

impl Uplink {
    fn new() -> Result<Uplink, String> {
        let (unshared_read, unshared_write) = pipe()?;
        let (configured_read, configured_write) = pipe()?;
        Ok(Uplink {
            unshared_read,
            unshared_write,
            configured_read,
            configured_write,
        })
    }

    /// Keeps init's ends and closes the helper's, so that each side sees the other go.
    fn into_init_side(self) -> InitUplink {
        InitUplink {
            unshared: self.unshared_write,
            configured: self.configured_read,
        }
    }
}

/// The helper's side: waits until init has its network namespace, starts slirp4netns on it
/// from the host's pid namespace (never inside the sandbox's), and lets init go on. A
/// slirp4netns that fails costs the session its outbound network, never the session: the
/// reason goes to the build's log.
fn connect_uplink(
    program: &Path,
    uplink: Uplink,
    init_pid: i32,
    guard_generation: Option<u32>,
) -> Option<Slirp> {
    let Uplink {
        unshared_read,
        unshared_write,
        configured_read,
        configured_write,
    } = uplink;
    drop(unshared_write);
    drop(configured_read);
    // The guard is checked for every session (while init builds the sandbox), and put in place
    // again unless the ruleset is still at the generation that holds it: the ruleset may have
    // been flushed since the node looked, and slirp4netns must never run unguarded.
    let guard = match guard_generation {
        Some(generation) if guard_unchanged(generation) => Ok(()),
        _ => install_guard().map(|_| ()),
    };
    let mut byte = [0u8; 1];
    if fs::File::from(unshared_read).read_exact(&mut byte).is_err() {
        // Init failed before its network namespace existed; its report says why.
        return None;
    }
    let slirp = match guard {
        Err(reason) => Err(format!(
            "the host's own addresses cannot be guarded from the build ({reason})"
        )),
        Ok(()) => start_slirp(program, init_pid),
    };
    let slirp = match slirp {
        Ok(slirp) => Some(slirp),
        Err(reason) => {
            eprintln!("peerbuild: outbound network unavailable: {reason}");
            None
        }
    };
    let _ = fs::File::from(configured_write).write_all(b"1");
    slirp
}

/// Init's side of [`connect_uplink`].
fn wait_for_uplink(uplink: &InitUplink) -> Result<(), String> {
    // SAFETY: plain writes and reads of one byte on descriptors init owns.
    let (wrote, read) = unsafe {
        let byte = [b'1'];
        let wrote = libc::write(uplink.unshared.as_raw_fd(), byte.as_ptr().cast(), 1);
        let mut answer = [0u8; 1];
        let read = libc::read(uplink.configured.as_raw_fd(), answer.as_mut_ptr().cast(), 1);
        (wrote, read)
    };
    if wrote != 1 || read != 1 {
        return Err("the helper went away while the network was set up".into());
    }
    Ok(())
}

/// A child of the helper that moves init into the session's cgroups (see
/// [`Cgroups::attach`]), so that the kernel's wait overlaps with the rest of the set-up.
struct Attacher {
    /// `None` when there are no cgroups to move into.
    pid: Option<i32>,
    /// The child's reason, if it fails; the end of the pipe once it exits.
    reason: Option<OwnedFd>,
}

impl Attacher {
    fn start(cgroups: &Cgroups, init_pid: i32) -> Result<Attacher, String> {
        if cgroups.is_empty() {
            return Ok(Attacher {
                pid: None,
                reason: None,
            });
        }
        let (reason_read, reason_write) = pipe()?;
        // SAFETY: the helper is single-threaded, so the child may do anything after fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(os_error("cannot fork"));
        }
        if pid == 0 {
            drop(reason_read);
            let code = match cgroups.attach(init_pid) {
                Ok(()) => 0,
                Err(reason) => {
                    let _ = fs::File::from(reason_write).write_all(reason.as_bytes());
                    1
                }
            };
            // SAFETY: _exit ends the child without running the helper's exit handlers.
            unsafe { libc::_exit(code) };
        }
        drop(reason_write);
        Ok(Attacher {
            pid: Some(pid),
            reason: Some(reason_read),
        })
    }

    /// Waits until init is in every cgroup, or says why it is not.
    fn wait(self) -> Result<(), String> {
        let (Some(pid), Some(reason_read)) = (self.pid, self.reason) else {
            return Ok(());
        };
        let mut reason = String::new();
        let _ = fs::File::from(reason_read).read_to_string(&mut reason);
        let mut status = 0;
        // SAFETY: waitpid writes only to `status`; the child exits once it has written.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        let exited_ok = waited == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        match (exited_ok, reason.is_empty()) {
            (true, true) => Ok(()),
            (_, false) => Err(reason),
            (false, true) => Err("cannot move the sandbox into its cgroups".into()),
        }
    }
}

/// Init's side of [`Attacher`]: waits for the helper's word that init is in its cgroups.
fn wait_until_attached(attached: &OwnedFd) -> Result<(), String> {
    let mut byte = [0u8; 1];
    loop {
        // SAFETY: reads at most one byte into `byte` from a descriptor init owns.
        let read = unsafe { libc::read(attached.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        if read < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        if read == 1 && byte[0] == b'1' {
            return Ok(());
        }
        return Err(NOT_ATTACHED.into());
    }
}

/// What init reports when the helper did not say that it is in its cgroups.
const NOT_ATTACHED: &str = "the helper did not move the sandbox into its cgroups";

/// The sandbox's init: sets the sandbox up, starts the shell, reaps orphans, and exits with the
/// shell's status, which kills whatever is left in the pid namespace.
fn init_main(plan: &Plan, report: OwnedFd) -> ! {
    let mut report = fs::File::from(report);
    let shell_pid = match set_up(plan).and_then(|()| spawn_shell(plan)) {
        Ok(pid) => pid,
        Err(message) => {
            let _ = report.write_all(message.as_bytes());
            // SAFETY: _exit ends the process without running the parent's exit handlers.
            unsafe { libc::_exit(crate::helper::EXIT_CANNOT_START) };
        }
    };
    let _ = report.write_all(b"ok");
    drop(report);
    crate::helper::release_session_pipes();
    let code = reap_until(shell_pid);
    // SAFETY: as above.
    unsafe { libc::_exit(code) }
}

fn set_up(plan: &Plan) -> Result<(), String> {
    plan.cgroups.apply_rlimits()?;
    // SAFETY: unshare changes only this process's namespaces.
    let unshared = unsafe {
        libc::unshare(
            libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
        )
    };
    if unshared < 0 {
        return Err(os_error("cannot create the sandbox's namespaces"));
    }
    // Nothing mounted from here on may propagate back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let hostname = b"peerbuild";
    // SAFETY: sethostname reads `hostname.len()` bytes.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } < 0 {
        return Err(os_error("cannot set the sandbox's host name"));
    }
    loopback_up()?;
    if let Some(uplink) = &plan.uplink {
        wait_for_uplink(uplink)?;
    }
    let workspace = clone_mount(plan.workdir, None)?;
    // peerbuild's own tools for the build (`codebuild-hash-files`), read-only beside the
    // workspace, as every backend has them.
    let tools = match plan.workdir.parent().map(|p| p.join("bin")) {
        Some(path) if path.is_dir() => Some((read_only(clone_mount(&path, None)?)?, path)),
        _ => None,
    };
    build_root(plan)?;
    enter_root(&plan.layout.root)?;
    // The workspace goes last, so that it shows through whatever mask or tmpfs covers its
    // parents (it usually lives in the node's data directory), and after the pivot, so that a
    // link the build left in the upper layer resolves inside the sandbox, never on the host.
    fs::create_dir_all(plan.workdir)
        .map_err(|e| format!("cannot create {}: {e}", plan.workdir.display()))?;
    attach(&workspace, plan.workdir)?;
    if let Some((tools, path)) = &tools {
        fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        attach(tools, path)?;
    }
    std::env::set_current_dir(plan.workdir)
        .map_err(|e| format!("cannot enter the workspace {}: {e}", plan.workdir.display()))?;
    // The limits hold before anything of the build's runs: init goes on only once the helper
    // has moved it into the session's cgroups. The cgroup namespace comes after the move, so
    // that its root is the session's cgroup, and before the user namespace, so that the host's
    // user namespace owns it.
    wait_until_attached(&plan.attached)?;
    // SAFETY: unshare changes only this process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } < 0 {
        return Err(os_error("cannot create the sandbox's cgroup namespace"));
    }
    enter_user_namespace(plan.user_namespace)?;
    // If the helper dies (even by SIGKILL), init dies, and with it the whole sandbox. Set
    // here because changing credentials clears it.
    // SAFETY: prctl with these arguments only changes this process's attributes.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    verify(plan.host_namespaces)
}

fn build_root(plan: &Plan) -> Result<(), String> {
    let layout = plan.layout;
    let lower = clone_mount(plan.root, Some(plan.user_namespace))?;
    attach(&lower, &layout.lower)?;
    // Overlay options are comma-separated and layers colon-separated, so the layers are named
    // relative to the sandbox folder: its own path may hold any character.
    std::env::set_current_dir(&layout.base)
        .map_err(|e| format!("cannot enter {}: {e}", layout.base.display()))?;
    // `volatile`: nothing syncs the upper layer's file system, which would otherwise be synced as
    // a whole (every other writer's data on it too) when init exits and the overlay goes, at
    // the end of every session, and whenever the build calls sync. The upper layer is scratch
    // that lives no longer than its build; see `Layout::clear_volatile_marker`.
    mount(
        Some("overlay"),
        &layout.root,
        Some("overlay"),
        0,
        Some("lowerdir=./lower,upperdir=./upper,workdir=./work,volatile"),
    )?;
    let root = &layout.root;
    let inside = |path: &str| root.join(path);
    // An image's root folder may lack the mount points (the host's never does); they are made
    // in the upper layer, which is the session's.
    for point in ["proc", "sys", "dev", "tmp", "run"] {
        match fs::symlink_metadata(inside(point)) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(format!("the image's /{point} is not a folder")),
            Err(_) => fs::create_dir(inside(point))
                .map_err(|e| format!("cannot create /{point} in the sandbox: {e}"))?,
        }
    }
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(Some("proc"), &inside("proc"), Some("proc"), flags, None)?;
    mount(
        Some("sysfs"),
        &inside("sys"),
        Some("sysfs"),
        flags | libc::MS_RDONLY,
        None,
    )?;
    mount_dev(&inside("dev"))?;
    mount(
        Some("tmpfs"),
        &inside("tmp"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;
    // The host's runtime state (daemon sockets among it) stays out; unix sockets of the lower
    // layer cannot be connected to through an overlay anyway, and this makes it explicit.
    mount(
        Some("tmpfs"),
        &inside("run"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&format!("mode=755,uid={HOST_ID_BASE},gid={HOST_ID_BASE}")),
    )?;
    let lock = inside("run/lock");
    fs::create_dir(&lock).map_err(|e| format!("cannot create /run/lock: {e}"))?;
    fs::set_permissions(&lock, fs::Permissions::from_mode(0o1777))
        .map_err(|e| format!("cannot chmod /run/lock: {e}"))?;
    Ok(())
}

/// A fresh `/dev` with only the harmless devices, a private devpts and `/dev/shm`.
fn mount_dev(dev: &Path) -> Result<(), String> {
    mount(
        Some("tmpfs"),
        dev,
        Some("tmpfs"),
        libc::MS_NOSUID,
        Some("mode=755"),
    )?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        fs::File::create(&target)
            .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        mount(
            Some(&format!("/dev/{name}")),
            &target,
            None,
            libc::MS_BIND,
            None,
        )?;
    }
    for dir in ["pts", "shm"] {
        fs::create_dir(dev.join(dir)).map_err(|e| format!("cannot create /dev/{dir}: {e}"))?;
    }
    mount(
        Some("devpts"),
        &dev.join("pts"),
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount(
        Some("tmpfs"),
        &dev.join("shm"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;
    let links = [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ];
    for (name, target) in links {
        std::os::unix::fs::symlink(target, dev.join(name))
            .map_err(|e| format!("cannot create /dev/{name}: {e}"))?;
    }
    Ok(())
}

/// Brings the new network namespace's loopback up: builds may serve and test on localhost.
fn loopback_up() -> Result<(), String> {
    // SAFETY: a plain socket used only for the interface ioctls below.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(os_error("cannot open a socket"));
    }
    // SAFETY: `socket` was just created and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(socket) };
    // SAFETY: ifreq is plain data; the name fits with its NUL; the ioctls read and write it.
    unsafe {
        let mut request: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            request.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(os_error("cannot read the loopback's flags"));
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(os_error("cannot bring the loopback up"));
        }
    }
    Ok(())
}

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// A detached copy of the mount at `path` (not its submounts), without set-uid or device
/// files, showing host ids through the sandbox's id map when `idmap` is given.
fn clone_mount(path: &Path, idmap: Option<&OwnedFd>) -> Result<OwnedFd, String> {
    let c = c_path(path)?;
    // SAFETY: open_tree reads the path and returns a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(os_error(&format!(
            "cannot clone the mount {}",
            path.display()
        )));
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | idmap.map_or(0, |_| MOUNT_ATTR_IDMAP),
        attr_clr: 0,
        propagation: 0,
        userns_fd: idmap.map_or(0, |fd| fd.as_raw_fd() as u64),
    };
    set_attributes(&tree, &attr).map_err(|()| {
        os_error(&format!(
            "cannot map the ids of {} (idmapped mounts need Linux 5.12 and a file system that supports them)",
            path.display()
        ))
    })?;
    Ok(tree)
}

/// `mount_setattr` on a detached mount; `Err` leaves the reason in `errno`.
fn set_attributes(tree: &OwnedFd, attr: &MountAttr) -> Result<(), ()> {
    // SAFETY: mount_setattr reads `attr` (its size is passed) and the empty path.
    let done = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if done < 0 { Err(()) } else { Ok(()) }
}

/// Makes a detached mount read-only.
fn read_only(tree: OwnedFd) -> Result<OwnedFd, String> {
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    set_attributes(&tree, &attr).map_err(|()| os_error("cannot make a mount read-only"))?;
    Ok(tree)
}

fn attach(tree: &OwnedFd, target: &Path) -> Result<(), String> {
    let c = c_path(target)?;
    // SAFETY: move_mount reads the paths; the tree descriptor stays ours.
    let done = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if done < 0 {
        return Err(os_error(&format!("cannot mount at {}", target.display())));
    }
    Ok(())
}

fn mount(
    source: Option<&str>,
    target: &Path,
    kind: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let c = |s: Option<&str>| s.map(CString::new).transpose();
    let (source_c, kind_c, data_c) = match (c(source), c(kind), c(data)) {
        (Ok(a), Ok(b), Ok(d)) => (a, b, d),
        _ => return Err("a mount argument holds a NUL byte".into()),
    };
    let target_c = c_path(target)?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let done = unsafe {
        libc::mount(
            ptr(&source_c),
            target_c.as_ptr(),
            ptr(&kind_c),
            flags,
            ptr(&data_c).cast(),
        )
    };
    if done < 0 {
        return Err(os_error(&format!(
            "cannot mount {} on {}",
            kind.or(source).unwrap_or("a mount"),
            target.display()
        )));
    }
    Ok(())
}

/// Makes `root` the root of this mount namespace and detaches the host's root beneath it, so
/// nothing of the host's tree stays reachable.
fn enter_root(root: &Path) -> Result<(), String> {
    std::env::set_current_dir(root).map_err(|e| format!("cannot enter {}: {e}", root.display()))?;
    // SAFETY: pivot_root(".", ".") stacks the old root on the new one; both strings are static.
    if unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) } < 0 {
        return Err(os_error("cannot switch to the sandbox's root"));
    }
    // SAFETY: detaches the old root, now mounted on top of ".".
    if unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) } < 0 {
        return Err(os_error("cannot detach the host's root"));
    }
    std::env::set_current_dir("/").map_err(|e| format!("cannot enter /: {e}"))
}

/// Joins the sandbox's user namespace as root inside (uid [`HOST_ID_BASE`] on the host).
fn enter_user_namespace(user_namespace: &OwnedFd) -> Result<(), String> {
    // SAFETY: this process is single-threaded and shares no file-system attributes, as setns
    // into a user namespace requires; the id calls only change this process's credentials.
    unsafe {
        if libc::setns(user_namespace.as_raw_fd(), libc::CLONE_NEWUSER) < 0 {
            return Err(os_error("cannot enter the sandbox's user namespace"));
        }
        if libc::setgroups(0, std::ptr::null()) < 0
            || libc::setresgid(0, 0, 0) < 0
            || libc::setresuid(0, 0, 0) < 0
        {
            return Err(os_error("cannot become root in the sandbox"));
        }
    }
    Ok(())
}

/// Fails unless every namespace differs from the host's and root inside is unprivileged
/// outside: a set-up step that silently did nothing must not run a build.
fn verify(host: &NamespaceIds) -> Result<(), String> {
    let now = namespace_ids()?;
    for ((name, before), (_, after)) in host.iter().zip(&now) {
        if before == after {
            return Err(format!(
                "the sandbox still shares the host's {name} namespace"
            ));
        }
    }
    let map = fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let fields: Vec<&str> = map.split_whitespace().collect();
    let expected = [
        "0".to_owned(),
        HOST_ID_BASE.to_string(),
        ID_COUNT.to_string(),
    ];
    if fields != expected || std::process::id() != 1 {
        return Err(format!(
            "the sandbox's identity is wrong: pid {}, uid map {:?}",
            std::process::id(),
            map.trim()
        ));
    }
    Ok(())
}

/// Starts the shell with the driver, in a new session, as the requested user inside.
fn spawn_shell(plan: &Plan) -> Result<i32, String> {
    crate::helper::spawn_driver_shell(plan.shell, plan.workdir, plan.identity)
        .map_err(|e| format!("cannot start the build's shell `{}`: {e}", plan.shell))
}

/// Reaps every process re-parented to init until the shell exits; returns its status.
fn reap_until(shell_pid: i32) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only to `status`.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == shell_pid {
            return crate::helper::decode_status(status);
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 128 + libc::SIGKILL;
        }
    }
}

pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(os_error("cannot create a pipe"));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub(crate) fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("the path {} holds a NUL byte", path.display()))
}

pub(crate) fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}
