//! Outbound network for `namespace` sessions: slirp4netns, and the nftables guard that keeps
//! it away from the host's own services.
//!
//! A session that asks for network gets a tap device in its network namespace, served by a
//! slirp4netns process that the helper starts once the sandbox's init has unshared that
//! namespace and before the build's shell runs. slirp4netns turns the sandbox's packets into
//! ordinary sockets in the host's network namespace, so by itself it would let a build reach any
//! listener on the host: its loopback (`--disable-host-loopback` closes the `10.0.2.2` door
//! only), and every service bound to `0.0.0.0`, the pool's port and the node's API among them.
//! So slirp4netns runs with a group id of its own ([`SLIRP_GID`], uid 0 kept so it may enter the
//! namespace) and the guard, an nftables table of ours, rejects every packet such a socket
//! sends to an address local to the host, on any interface, and every broadcast and multicast
//! one (which the host would hear too: the pool's mDNS among them). Without the guard there is no
//! outbound network: the executor probes for both at start-up.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::isolate::{HOST_ID_BASE, ID_COUNT, os_error, pipe};

/// The host group id slirp4netns runs with, which the guard matches its sockets by: the top of
/// the sandbox's host id range (gid 65535 inside, which no distribution gives a name), so no
/// host account has it.
pub const SLIRP_GID: u32 = HOST_ID_BASE + ID_COUNT - 1;

/// The nftables table that holds the guard; nothing else in the ruleset is touched.
pub const GUARD_TABLE: &str = "inet peerbuild";

/// The bridge interface of the `docker` backend's network for builds that ask for network.
pub const DOCKER_BRIDGE: &str = "pb-docker";

/// slirp4netns's DNS forwarder, as the sandbox sees it.
pub const SLIRP_DNS: &str = "10.0.2.3";

/// How long the helper waits for slirp4netns to configure the sandbox's interface.
const SLIRP_READY_WAIT_MS: i32 = 10_000;

/// Host bridges whose addresses (containers, virtual machines, other builds' containers) a
/// build must not reach through slirp4netns, which connects from the host itself and so is not
/// held back by the forwarding rules that isolate those networks.
const HOST_BRIDGES: [&str; 8] = [
    DOCKER_BRIDGE,
    "docker0",
    "br-*",
    "virbr*",
    "lxcbr*",
    "cni*",
    "podman*",
    "incusbr*",
];

/// The guard: created, or replaced as a whole, in one nftables transaction (declaring the
/// table first makes the `delete` succeed when it did not exist yet). Its chains run before
/// NAT (priority -300), so a port a container publishes on the host is judged by the host
/// address it was asked for, not the container address Docker rewrites it to.
fn guard_rules() -> String {
    let mut slirp = format!(
        "\t\tmeta skgid {SLIRP_GID} fib daddr type {{ local, broadcast, multicast }} reject\n"
    );
    for bridge in HOST_BRIDGES {
        slirp.push_str(&format!(
            "\t\tmeta skgid {SLIRP_GID} oifname \"{bridge}\" reject\n"
        ));
    }
    format!(
        "table {GUARD_TABLE}\n\
         delete table {GUARD_TABLE}\n\
         table {GUARD_TABLE} {{\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority -300; policy accept;\n\
         {slirp}\
         \t}}\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority -300; policy accept;\n\
         \t\tiifname \"{DOCKER_BRIDGE}\" fib daddr type {{ local, broadcast, multicast }} drop\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority 0; policy accept;\n\
         \t\tiifname \"{DOCKER_BRIDGE}\" fib daddr type {{ local, broadcast, multicast }} drop\n\
         \t}}\n\
         }}\n"
    )
}

/// Installs (or replaces) the guard table. Needs root and the `nft` command. Returns the
/// generation of the host's nftables ruleset ([`ruleset_generation`]) that holds the guard just
/// as installed, when that is known: when the install was the one change between two readings
/// (none where netlink cannot be read, or another program changed the ruleset meanwhile).
pub fn install_guard() -> Result<Option<u32>, String> {
    let before = ruleset_generation().ok();
    run_nft()?;
    let after = ruleset_generation().ok();
    Ok(match (before, after) {
        (Some(before), Some(after)) if after == next_generation(before) => Some(after),
        _ => None,
    })
}

/// Whether the guard is certainly in place: installed as the ruleset's change to `generation`
/// (see [`install_guard`]), and the ruleset not changed since. Any change to any table, a flush
/// among them, moves the generation on; so this costs one netlink round trip instead of an
/// `nft` run.
pub fn guard_unchanged(generation: u32) -> bool {
    ruleset_generation() == Ok(generation)
}

/// The generation after `generation`: the kernel counts commits and skips 0.
fn next_generation(generation: u32) -> u32 {
    match generation.wrapping_add(1) {
        0 => 1,
        next => next,
    }
}

/// The generation of the host's nftables ruleset (in this network namespace), which the kernel
/// moves on with every change committed to any table (`NFT_MSG_GETGEN` over netlink).
pub fn ruleset_generation() -> Result<u32, String> {
    const NETLINK_NETFILTER: libc::c_int = 12;
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_NEWGEN: u16 = 15;
    const NFT_MSG_GETGEN: u16 = 16;
    const NFTA_GEN_ID: u16 = 1;
    const HEADER: usize = 16;
    const NFGENMSG: usize = 4;
    // SAFETY: a plain netlink socket, owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(os_error("cannot open a netfilter netlink socket"));
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let socket = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // nlmsghdr (length, type, flags, sequence, port id), then nfgenmsg (family AF_UNSPEC,
    // version NFNETLINK_V0, resource id 0), all in host order but the resource id.
    let sequence: u32 = 1;
    let mut request = Vec::with_capacity(HEADER + NFGENMSG);
    request.extend_from_slice(&((HEADER + NFGENMSG) as u32).to_ne_bytes());
    request.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    request.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    request.extend_from_slice(&sequence.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    // SAFETY: sockaddr_nl is plain data; zeroed, it names the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: sends `request` to the address above, both valid for the call.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent != request.len() as isize {
        return Err(os_error(
            "cannot ask netfilter for the ruleset's generation",
        ));
    }
    let mut reply = [0u8; 512];
    let received = loop {
        // SAFETY: receives at most `reply.len()` bytes into `reply`.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                reply.as_mut_ptr().cast(),
                reply.len(),
                0,
            )
        };
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        if n < 0 {
            return Err(os_error("cannot read the ruleset's generation"));
        }
        break n as usize;
    };
    parse_generation(
        &reply[..received],
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN,
        NFTA_GEN_ID,
    )
    .ok_or_else(|| "netfilter's answer holds no ruleset generation".to_owned())
}

/// The generation in a `NFT_MSG_NEWGEN` message: its `NFTA_GEN_ID` attribute (big-endian).
fn parse_generation(message: &[u8], newgen: u16, gen_id: u16) -> Option<u32> {
    let u16_at = |at: usize| {
        Some(u16::from_ne_bytes(
            message.get(at..at + 2)?.try_into().ok()?,
        ))
    };
    let length = u32::from_ne_bytes(message.get(0..4)?.try_into().ok()?) as usize;
    if u16_at(4)? != newgen || length > message.len() {
        return None;
    }
    // Attributes follow the 16-byte header and the 4-byte nfgenmsg, each 4-byte aligned.
    let mut at = 20;
    while at + 4 <= length {
        let size = u16_at(at)? as usize;
        if size < 4 || at + size > length {
            return None;
        }
        if u16_at(at + 2)? & 0x3fff == gen_id && size >= 8 {
            return Some(u32::from_be_bytes(
                message.get(at + 4..at + 8)?.try_into().ok()?,
            ));
        }
        at += (size + 3) & !3;
    }
    None
}

fn run_nft() -> Result<(), String> {
    let nft = find_program("nft").ok_or("the nft command (package nftables) is not installed")?;
    let mut child = Command::new(&nft)
        .args(["-f", "-"])
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", nft.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(guard_rules().as_bytes())
            .map_err(|e| format!("cannot talk to nft: {e}"))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "nft could not install the table {GUARD_TABLE} ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

/// A program in the usual system folders or on `PATH`, if it is installed.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let system = ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"];
    std::env::split_paths(&path)
        .chain(system.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate.is_absolute()
                && std::fs::metadata(candidate)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A running slirp4netns serving one sandbox. It exits when the helper closes its end of the
/// exit pipe (dropping this, or the helper dying), and the helper kills it with the rest of
/// its children in any case.
pub struct Slirp {
    _exit: OwnedFd,
}

/// Starts slirp4netns for the network namespace of `init_pid` and waits until the sandbox's
/// interface is configured. Runs in the single-threaded helper.
pub fn start_slirp(program: &Path, init_pid: i32) -> Result<Slirp, String> {
    let (ready_read, ready_write) = pipe()?;
    let (exit_read, exit_write) = pipe()?;
    let (ready_fd, exit_fd) = (ready_write.as_raw_fd(), exit_read.as_raw_fd());
    let mut command = Command::new(program);
    command
        .args([
            "--configure",
            "--mtu=65520",
            "--disable-host-loopback",
            "--enable-sandbox",
            "--enable-seccomp",
        ])
        .arg(format!("--ready-fd={ready_fd}"))
        .arg(format!("--exit-fd={exit_fd}"))
        .arg(init_pid.to_string())
        .arg("tap0")
        .env_clear()
        // It chats about every step; nothing of it may hold the session's output open.
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: runs between fork and exec in the single-threaded helper; sigprocmask, fcntl,
    // setgroups and setresgid are async-signal-safe and read only values copied before the fork.
    unsafe {
        command.pre_exec(move || {
            // The helper blocks the signals it waits for; slirp4netns must not inherit that.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            for fd in [ready_fd, exit_fd] {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // The guard knows slirp4netns's sockets by this group; uid 0 stays, so that it may
            // enter the sandbox's network namespace.
            let groups = [SLIRP_GID];
            if libc::setgroups(1, groups.as_ptr()) < 0
                || libc::setresgid(SLIRP_GID, SLIRP_GID, SLIRP_GID) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    drop(ready_write);
    drop(exit_read);
    let slirp = Slirp { _exit: exit_write };
    match wait_ready(&ready_read) {
        Ok(()) => Ok(slirp),
        Err(reason) => {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            Err(format!("{reason} ({status})"))
        }
    }
}

/// Waits for slirp4netns's byte on the ready pipe.
fn wait_ready(ready: &OwnedFd) -> Result<(), String> {
    let mut poll = libc::pollfd {
        fd: ready.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: polls one descriptor we own.
        let n = unsafe { libc::poll(&mut poll, 1, SLIRP_READY_WAIT_MS) };
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        if n < 0 {
            return Err(os_error("cannot wait for slirp4netns"));
        }
        if n == 0 {
            return Err("slirp4netns did not configure the network in time".into());
        }
        break;
    }
    let mut byte = [0u8; 1];
    // SAFETY: reads at most one byte into `byte`.
    let read = unsafe { libc::read(ready.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
    if read == 1 {
        Ok(())
    } else {
        Err("slirp4netns exited before the network was configured".into())
    }
}

/// Writes the sandbox's `/etc/resolv.conf` (see [`sandbox_resolv_conf`]) in the overlay's upper
/// layer, never on the host. An earlier session's file (or the build's own) is kept; the file is
/// created, never opened, so no link the build left is followed.
pub fn resolv_conf_in_upper(upper: &Path) -> Result<(), String> {
    let etc = upper.join("etc");
    match std::fs::symlink_metadata(&etc) {
        Ok(meta) if meta.is_dir() => {}
        // The build replaced /etc by something else, which already hides the host's.
        Ok(_) => return Ok(()),
        Err(_) => {
            std::fs::create_dir(&etc)
                .map_err(|e| format!("cannot create {}: {e}", etc.display()))?;
            let meta = std::fs::metadata("/etc").map_err(|e| format!("cannot read /etc: {e}"))?;
            set_owner(&etc, meta.permissions().mode() & 0o7777)?;
        }
    }
    let target = etc.join("resolv.conf");
    if std::fs::symlink_metadata(&target).is_ok() {
        return Ok(());
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&target)
        .map_err(|e| format!("cannot write {}: {e}", target.display()))?;
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let upstream = std::fs::read_to_string("/run/systemd/resolve/resolv.conf").ok();
    file.write_all(sandbox_resolv_conf(&host, upstream.as_deref()).as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", target.display()))?;
    set_owner(&target, 0o644)
}

/// The sandbox's resolver configuration: slirp4netns's DNS forwarder, which sends queries to
/// the host's first nameserver. When that one is on the host's loopback (systemd-resolved's
/// `127.0.0.53`), the guard would reject the forwarded queries, so the sandbox asks the
/// resolvers behind it (systemd-resolved's `upstream` file) directly instead, if there are any.
fn sandbox_resolv_conf(host: &str, upstream: Option<&str>) -> String {
    let nameservers = |text: &str| -> Vec<std::net::IpAddr> {
        text.lines()
            .filter_map(
                |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                    ["nameserver", address, ..] => address.parse().ok(),
                    _ => None,
                },
            )
            .collect()
    };
    let first_is_loopback = nameservers(host).first().is_some_and(|a| a.is_loopback());
    let behind: Vec<_> = upstream
        .map(nameservers)
        .unwrap_or_default()
        .into_iter()
        // The sandbox has no IPv6.
        .filter(|a| a.is_ipv4() && !a.is_loopback())
        .take(3)
        .collect();
    if first_is_loopback && !behind.is_empty() {
        return behind.iter().map(|a| format!("nameserver {a}\n")).collect();
    }
    format!("nameserver {SLIRP_DNS}\n")
}

/// Gives an upper-layer path to root inside the sandbox, with `mode`.
fn set_owner(path: &Path, mode: u32) -> Result<(), String> {
    std::os::unix::fs::lchown(path, Some(HOST_ID_BASE), Some(HOST_ID_BASE))
        .map_err(|e| format!("cannot chown {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_names_only_our_table() {
        let rules = guard_rules();
        assert!(
            rules.contains(
                "meta skgid 165535 fib daddr type { local, broadcast, multicast } reject"
            )
        );
        assert!(
            rules.contains(
                "iifname \"pb-docker\" fib daddr type { local, broadcast, multicast } drop"
            )
        );
        for line in rules
            .lines()
            .filter(|l| l.starts_with("table") || l.starts_with("delete"))
        {
            assert!(line.contains("inet peerbuild"), "{line}");
        }
        // nftables itself accepts them (checked, not applied), wherever it is installed.
        match find_program("nft") {
            Some(nft) => {
                let mut child = Command::new(nft)
                    .args(["-c", "-f", "-"])
                    .stdin(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("nft runs");
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(rules.as_bytes())
                    .expect("write the rules");
                let output = child.wait_with_output().expect("nft ends");
                assert!(
                    output.status.success(),
                    "nft refuses the guard: {}\n{rules}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            None => assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "nft must be installed under CI"
            ),
        }
    }

    #[test]
    fn the_sandbox_asks_slirp_for_names_unless_the_host_resolves_on_its_loopback() {
        let check = |host: &str, upstream: Option<&str>, expected: &str| {
            assert_eq!(sandbox_resolv_conf(host, upstream), expected, "{host:?}");
        };
        check("nameserver 10.255.255.53\n", None, "nameserver 10.0.2.3\n");
        check(
            "# comment\nnameserver 192.168.1.1\nnameserver 127.0.0.1\n",
            Some("nameserver 9.9.9.9\n"),
            "nameserver 10.0.2.3\n",
        );
        check(
            "nameserver 127.0.0.53\noptions edns0\n",
            Some("nameserver 192.168.1.1\nnameserver 127.0.0.1\nnameserver 2001:db8::1\n"),
            "nameserver 192.168.1.1\n",
        );
        check("nameserver 127.0.0.53\n", None, "nameserver 10.0.2.3\n");
        check("", None, "nameserver 10.0.2.3\n");
    }

    #[test]
    fn generations_are_read_from_netfilter_answers() {
        let newgen: u16 = (10 << 8) | 15;
        let mut message = Vec::new();
        message.extend_from_slice(&44u32.to_ne_bytes());
        message.extend_from_slice(&newgen.to_ne_bytes());
        message.extend_from_slice(&[0; 10]);
        message.extend_from_slice(&[0; 4]);
        // NFTA_GEN_PROC_PID 42, then NFTA_GEN_ID 29, then NFTA_GEN_PROC_NAME "nft".
        for (kind, value) in [(2u16, 42u32.to_be_bytes()), (1, 29u32.to_be_bytes())] {
            message.extend_from_slice(&8u16.to_ne_bytes());
            message.extend_from_slice(&kind.to_ne_bytes());
            message.extend_from_slice(&value);
        }
        message.extend_from_slice(&7u16.to_ne_bytes());
        message.extend_from_slice(&3u16.to_ne_bytes());
        message.extend_from_slice(b"nft\0");
        assert_eq!(parse_generation(&message, newgen, 1), Some(29));
        assert_eq!(parse_generation(&message, newgen + 1, 1), None);
        assert_eq!(parse_generation(&message[..20], newgen, 1), None);
        assert_eq!(next_generation(u32::MAX), 1);
        assert_eq!(next_generation(7), 8);
    }

    #[test]
    fn slirp_runs_with_a_group_no_account_has() {
        assert_eq!(SLIRP_GID, 165_535);
    }
}
